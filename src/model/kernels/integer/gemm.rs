//! Quantized matrix product for 1x1 convolutions and fully connected layers, with the "fp32 requantization"
//! of TFLite and XNNPACK: the int32 sum is multiplied by a float scale, rounded half to even, shifted by the
//! output zero point and clamped.
//!
//! On x86_64 CPUs with AVX-512 VNNI the product runs on `vpdpbusd` (u8 activations times s8 weights, four
//! products per int32 lane); on those with only AVX2 it runs on `vpmaddwd` (both widened to i16, two products
//! per int32 lane); elsewhere a portable kernel in plain Rust gives the same bytes.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::Requantize;

/// Output channels per vector of int32 sums.
const LANES: usize = 16;
/// Depth values multiplied and summed into one int32 lane by `vpdpbusd`.
const GROUP: usize = 4;
/// Packed weight bytes for one depth group of one block of `LANES` output channels.
const GROUP_BYTES: usize = LANES * GROUP;
/// Most blocks of output channels one kernel call keeps in registers.
const MAX_VECTORS: usize = 4;
/// Most pixels one kernel call keeps in registers.
const MAX_TILE_PIXELS: usize = 16;
/// Output channels per AVX2 vector of int32 sums; a column is one such run of channels.
const COLUMN_LANES: usize = 8;
/// Depth values multiplied and summed into one int32 lane by `vpmaddwd`.
const PAIR: usize = 2;
/// Packed `Variant::Avx2` weight bytes for one depth pair of one column.
const PAIR_BYTES: usize = COLUMN_LANES * PAIR;
/// Most columns one AVX2 kernel call keeps in registers. Two, with 6 pixels: 12 sums, 2 weights, the activation
/// and the product fill the 16 vector registers. Three columns of 4 pixels need a 17th, and the spill made them
/// 20-30% slower on the mid shapes (on Zen 4).
const AVX2_MAX_VECTORS: usize = 2;
/// Zero points beyond this would make `low - output_zero` inexact in f32.
const MAX_OUTPUT_ZERO: i32 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Variant {
    /// Fastest first.
    const ALL: &[Variant] = &[
        #[cfg(target_arch = "x86_64")]
        Variant::Vnni,
        #[cfg(target_arch = "x86_64")]
        Variant::Avx2,
        Variant::Portable,
    ];

    fn best() -> Variant {
        *Variant::ALL.iter().find(|v| v.is_available()).expect("the portable variant runs anywhere")
    }

    /// Whether this CPU has the features the variant's kernels are compiled for.
    fn is_available(self) -> bool {
        match self {
            Variant::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Variant::Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
        }
    }
}

/// Whether the products run on the CPU's 8-bit dot-product instructions.
pub fn has_vector_kernels() -> bool {
    Variant::best() != Variant::Portable
}

/// A run of neighbouring blocks (or, for AVX2, columns) of output channels that one kernel call computes together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    first_block: usize,
    vectors: usize,
}

#[derive(Debug)]
pub struct Gemm {
    out_channels: usize,
    depth: usize,
    variant: Variant,
    /// Weights minus 128 when unsigned, as s8. `Variant::Vnni`: per block of `LANES` channels, per depth group,
    /// `LANES` lanes of `GROUP` bytes. `Variant::Avx2`: per column of `COLUMN_LANES` channels, per depth pair,
    /// `COLUMN_LANES` lanes of `PAIR` bytes, widened to i16 as they are loaded (half the bytes to keep in cache).
    /// `Variant::Portable`: per block, per depth value, `LANES` bytes.
    packed: Vec<i8>,
    /// The rest below is padded to whole blocks with zeros.
    /// `bias - input_zero * sum_k (w - weight_zero)`, so the kernel never subtracts the input zero point.
    bias: Vec<[i32; LANES]>,
    /// `shift - weight_zero`, where `shift` (128 for unsigned weights, 0 for signed) was taken off the packed
    /// weights; times the pixel's sum of activations this restores `sum_k x * (w - weight_zero)`.
    row_sum_factor: Vec<[i32; LANES]>,
    needs_row_sums: bool,
    scale: Vec<[f32; LANES]>,
    output_zero: i32,
    /// `low - output_zero` and `high - output_zero`: clamping before rounding gives the same result as after,
    /// since both limits are integers, and keeps the float-to-int conversion in range.
    low_limit: f32,
    high_limit: f32,
    /// Runs of blocks (`Variant::Vnni`) or columns (`Variant::Avx2`).
    chunks: Vec<Chunk>,
    main_tile_pixels: usize,
}

impl Gemm {
    /// `weights`: row-major [out_channels][depth] bytes, read as i8 when `signed`, else u8;
    /// `weight_zero`: one zero point per output channel (0 for symmetric int8);
    /// `input_zero`: the activations' zero point (activations are always u8 here);
    /// `bias`: one int32 per output channel.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        out_channels: usize,
        depth: usize,
        weights: &[u8],
        signed: bool,
        weight_zero: &[i32],
        input_zero: i32,
        bias: &[i32],
        requantize: Requantize,
    ) -> Gemm {
        Gemm::with_variant(
            out_channels,
            depth,
            weights,
            signed,
            weight_zero,
            input_zero,
            bias,
            requantize,
            Variant::best(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn with_variant(
        out_channels: usize,
        depth: usize,
        weights: &[u8],
        signed: bool,
        weight_zero: &[i32],
        input_zero: i32,
        bias: &[i32],
        requantize: Requantize,
        variant: Variant,
    ) -> Gemm {
        assert_eq!(weights.len(), out_channels * depth, "weights must be out_channels x depth");
        assert_eq!(weight_zero.len(), out_channels, "one weight zero point per output channel");
        assert_eq!(bias.len(), out_channels, "one bias per output channel");
        assert_eq!(requantize.scale.len(), out_channels, "one scale per output channel");
        assert!(requantize.low <= requantize.high, "low must not exceed high");
        assert!(requantize.output_zero.abs() <= MAX_OUTPUT_ZERO, "output zero point out of range");
        assert!(requantize.scale.iter().all(|s| s.is_finite()), "scales must be finite");
        // The kernels' safety rests on this: a variant other than the portable one needs detected features.
        assert!(variant.is_available(), "{variant:?} is not supported here");

        let shift = if signed { 0 } else { 128 };
        let blocks = out_channels.div_ceil(LANES);
        let mut packed = match variant {
            Variant::Portable => vec![0i8; blocks * depth * LANES],
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => vec![0i8; out_channels.div_ceil(COLUMN_LANES) * packed_column_len(depth)],
            #[cfg(target_arch = "x86_64")]
            Variant::Vnni => vec![0i8; blocks * packed_block_len(depth)],
        };
        let mut padded_bias = vec![[0i32; LANES]; blocks];
        let mut row_sum_factor = vec![[0i32; LANES]; blocks];
        let mut scale = vec![[0f32; LANES]; blocks];
        for o in 0..out_channels {
            let (block, lane) = (o / LANES, o % LANES);
            let mut weight_sum = 0i64;
            // Where weight (o, k) goes: `first + (k / per) * step + k % per`, `per` a power of two. Worked out once a
            // row rather than matched for each weight, which made this loop most of a model's preparation time.
            let (first, per, step) = match variant {
                Variant::Portable => ((block * depth) * LANES + lane, 1, LANES),
                #[cfg(target_arch = "x86_64")]
                Variant::Avx2 => {
                    let (column, lane) = (o / COLUMN_LANES, o % COLUMN_LANES);
                    (column * packed_column_len(depth) + lane * PAIR, PAIR, PAIR_BYTES)
                }
                #[cfg(target_arch = "x86_64")]
                Variant::Vnni => (block * packed_block_len(depth) + lane * GROUP, GROUP, GROUP_BYTES),
            };
            for (k, &byte) in weights[o * depth..(o + 1) * depth].iter().enumerate() {
                let w = if signed { byte as i8 as i32 } else { byte as i32 };
                weight_sum += (w - weight_zero[o]) as i64;
                packed[first + (k >> per.trailing_zeros()) * step + (k & (per - 1))] = (w - shift) as i8;
            }
            // Wrapping: whenever the true sums fit in i32, the wrapped ones equal them.
            padded_bias[block][lane] = bias[o].wrapping_sub((input_zero as i64 * weight_sum) as i32);
            row_sum_factor[block][lane] = shift - weight_zero[o];
            scale[block][lane] = requantize.scale[o];
        }
        let needs_row_sums = row_sum_factor.iter().flatten().any(|&f| f != 0);
        let (chunks, main_tile_pixels) = match variant {
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => {
                let chunks = split_into_chunks(out_channels.div_ceil(COLUMN_LANES), AVX2_MAX_VECTORS);
                let widest = chunks.iter().map(|c| c.vectors).max().unwrap_or(1);
                (chunks, avx2_main_tile_pixels(widest))
            }
            _ => {
                let chunks = split_into_chunks(blocks, MAX_VECTORS);
                let widest = chunks.iter().map(|c| c.vectors).max().unwrap_or(1);
                (chunks, main_tile_pixels(widest))
            }
        };
        Gemm {
            out_channels,
            depth,
            variant,
            packed,
            bias: padded_bias,
            row_sum_factor,
            needs_row_sums,
            scale,
            output_zero: requantize.output_zero,
            low_limit: (requantize.low as i32 - requantize.output_zero) as f32,
            high_limit: (requantize.high as i32 - requantize.output_zero) as f32,
            chunks,
            main_tile_pixels,
        }
    }

    /// `input`: `pixels` rows of `depth` u8, contiguous (row stride = depth); `output`: `pixels` rows of
    /// `out_channels` u8. Panics if the slice lengths do not match.
    pub fn run(&self, input: &[u8], pixels: usize, output: &mut [u8]) {
        assert_eq!(input.len(), pixels * self.depth, "input must be pixels x depth");
        assert_eq!(output.len(), pixels * self.out_channels, "output must be pixels x out_channels");
        match self.variant {
            Variant::Portable => self.run_portable(input, pixels, output),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => self.run_avx2(input, pixels, output),
            #[cfg(target_arch = "x86_64")]
            Variant::Vnni => self.run_vnni(input, pixels, output),
        }
    }

    fn requantize_one(&self, sum: i32, scale: f32) -> u8 {
        let scaled = (sum as f32 * scale).max(self.low_limit).min(self.high_limit);
        // In range by the clamp: low <= result <= high.
        (scaled.round_ties_even() as i32 + self.output_zero) as u8
    }

    fn run_portable(&self, input: &[u8], pixels: usize, output: &mut [u8]) {
        let depth = self.depth;
        for pixel in 0..pixels {
            let row = &input[pixel * depth..(pixel + 1) * depth];
            let row_sum = if self.needs_row_sums { row_sum(row) } else { 0 };
            let out_row = &mut output[pixel * self.out_channels..(pixel + 1) * self.out_channels];
            for (block, out_block) in out_row.chunks_mut(LANES).enumerate() {
                let mut sums = [0i32; LANES];
                for (lane, sum) in sums.iter_mut().enumerate() {
                    let correction = self.row_sum_factor[block][lane].wrapping_mul(row_sum);
                    *sum = self.bias[block][lane].wrapping_add(correction);
                }
                let (weights, _) = self.packed[block * depth * LANES..(block + 1) * depth * LANES].as_chunks::<LANES>();
                for (&x, weights) in row.iter().zip(weights) {
                    // 255 * -128 and 255 * 127 both fit in i16, which lets LLVM multiply 16 bits wide.
                    let x = x as i16;
                    for (sum, &w) in sums.iter_mut().zip(weights) {
                        *sum = sum.wrapping_add((x * w as i16) as i32);
                    }
                }
                for (lane, out) in out_block.iter_mut().enumerate() {
                    *out = self.requantize_one(sums[lane], self.scale[block][lane]);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn run_vnni(&self, input: &[u8], pixels: usize, output: &mut [u8]) {
        // SAFETY: `Variant::Vnni` is only chosen after detecting avx512f, avx512bw, avx512vl and avx512vnni, the
        // features `vnni_tiles` is compiled for; `with_variant` asserts it.
        unsafe { self.vnni_tiles(input, pixels, output) }
    }

    /// `run_vnni`'s walk over the tiles, compiled for the kernels' features so that the row sums and the kernel
    /// calls inline into it: as separate calls they cost a fifth of the time of the low-depth layers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn vnni_tiles(&self, input: &[u8], pixels: usize, output: &mut [u8]) {
        let depth = self.depth;
        let mut row_sums = [0i32; MAX_TILE_PIXELS];
        let mut tails = [0u32; MAX_TILE_PIXELS];
        for (first_pixel, valid, tile_pixels) in tiles(pixels, self.main_tile_pixels) {
            for p in 0..valid {
                let row = &input[(first_pixel + p) * depth..(first_pixel + p + 1) * depth];
                row_sums[p] = if self.needs_row_sums { vnni_row_sum(row) } else { 0 };
                tails[p] = tail_word(row);
            }
            let tile = Tile { input, first_pixel, valid, row_sums: &row_sums, tails: &tails };
            for &chunk in &self.chunks {
                // SAFETY: this function's features are those `vnni_dispatch` needs.
                unsafe { self.vnni_dispatch(tile_pixels, &tile, chunk, output) };
            }
        }
    }

    /// Calls the `vnni_tile` compiled for this tile and chunk size.
    ///
    /// # Safety
    /// The CPU must support avx512f, avx512bw, avx512vl and avx512vnni.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn vnni_dispatch(&self, tile_pixels: usize, tile: &Tile, chunk: Chunk, output: &mut [u8]) {
        macro_rules! pick {
            ($($pixels:literal),*) => {
                match (tile_pixels, chunk.vectors) {
                    $(
                        ($pixels, 1) => unsafe { vnni_tile::<$pixels, 1>(self, tile, chunk.first_block, output) },
                        ($pixels, 2) => unsafe { vnni_tile::<$pixels, 2>(self, tile, chunk.first_block, output) },
                        ($pixels, 3) => unsafe { vnni_tile::<$pixels, 3>(self, tile, chunk.first_block, output) },
                        ($pixels, 4) => unsafe { vnni_tile::<$pixels, 4>(self, tile, chunk.first_block, output) },
                    )*
                    _ => unreachable!("no kernel for {tile_pixels} pixels x {} vectors", chunk.vectors),
                }
            };
        }
        pick!(1, 4, 6, 8, 12, 16)
    }

    #[cfg(target_arch = "x86_64")]
    fn run_avx2(&self, input: &[u8], pixels: usize, output: &mut [u8]) {
        let depth = self.depth;
        let row_words = pairs(depth);
        // Pixel tails run in tiles of four even when the main tile is smaller.
        let mut words = vec![0u32; self.main_tile_pixels.max(4) * row_words];
        let mut row_sums = [0i32; MAX_TILE_PIXELS];
        for (first_pixel, valid, tile_pixels) in tiles(pixels, self.main_tile_pixels) {
            for p in 0..valid {
                let row = &input[(first_pixel + p) * depth..(first_pixel + p + 1) * depth];
                let row_words = &mut words[p * row_words..(p + 1) * row_words];
                // SAFETY: `Variant::Avx2` is only chosen on CPUs with the features `avx2_widen_row` is compiled for.
                row_sums[p] = unsafe { avx2_widen_row(row, row_words) };
            }
            let tile = Avx2Tile { words: &words, row_words, first_pixel, valid, row_sums: &row_sums };
            for &chunk in &self.chunks {
                // SAFETY: `Variant::Avx2` is only chosen after detecting avx2 and fma, the features `avx2_tile` is
                // compiled for; `with_variant` asserts it.
                unsafe { self.avx2_dispatch(tile_pixels, &tile, chunk, output) };
            }
        }
    }

    /// Calls the `avx2_tile` compiled for this tile and chunk size.
    ///
    /// # Safety
    /// The CPU must support avx2 and fma.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2_dispatch(&self, tile_pixels: usize, tile: &Avx2Tile, chunk: Chunk, output: &mut [u8]) {
        macro_rules! pick {
            ($(($pixels:literal, $vectors:literal)),*) => {
                match (tile_pixels, chunk.vectors) {
                    $(
                        ($pixels, $vectors) => unsafe {
                            avx2_tile::<$pixels, $vectors>(self, tile, chunk.first_block, output)
                        },
                    )*
                    _ => unreachable!("no kernel for {tile_pixels} pixels x {} vectors", chunk.vectors),
                }
            };
        }
        // Only the pairs `avx2_main_tile_pixels` and `tile_pixels` can produce: more would spill registers.
        pick!((1, 1), (1, 2), (4, 1), (4, 2), (6, 1), (6, 2), (12, 1))
    }
}

/// The pixels of one kernel call: `valid` rows from `first_pixel`, with what safe code prepared for them.
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    input: &'a [u8],
    first_pixel: usize,
    valid: usize,
    row_sums: &'a [i32; MAX_TILE_PIXELS],
    /// The row's last `depth % GROUP` bytes, zero-padded, so the kernel never reads past a row.
    tails: &'a [u32; MAX_TILE_PIXELS],
}

/// Computes `PIXELS` pixels (of which `tile.valid` are real; the others repeat the last real one, so that the
/// loop has a fixed shape) times `VECTORS` blocks of output channels from `first_block`, and writes the bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn vnni_tile<const PIXELS: usize, const VECTORS: usize>(
    gemm: &Gemm,
    tile: &Tile,
    first_block: usize,
    output: &mut [u8],
) {
    const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let depth = gemm.depth;
    let out_channels = gemm.out_channels;
    assert!(tile.valid >= 1 && tile.valid <= PIXELS && PIXELS <= MAX_TILE_PIXELS);
    let block_len = packed_block_len(depth);
    let weights = &gemm.packed[first_block * block_len..(first_block + VECTORS) * block_len];
    let direct_bytes = direct_read_len(depth);
    let full_groups = direct_bytes / GROUP;
    // Loops of constant length rather than `std::array::from_fn`, whose closures LLVM left as calls.
    let mut rows: [&[u8]; PIXELS] = [&[]; PIXELS];
    for (p, row) in rows.iter_mut().enumerate() {
        let pixel = tile.first_pixel + p.min(tile.valid - 1);
        *row = &tile.input[pixel * depth..pixel * depth + direct_bytes];
    }

    let mut sums = [[_mm512_setzero_si512(); VECTORS]; PIXELS];
    for group in 0..full_groups {
        debug_assert!((group + 1) * GROUP <= direct_bytes);
        debug_assert!((VECTORS - 1) * block_len + (group + 1) * GROUP_BYTES <= weights.len());
        let mut w = [_mm512_setzero_si512(); VECTORS];
        for (v, w) in w.iter_mut().enumerate() {
            // SAFETY: group < full_groups <= groups(depth), so this 64-byte read ends within block v of the
            // chunk, at most (v + 1) * block_len <= weights.len().
            *w = unsafe { _mm512_loadu_si512(weights.as_ptr().add(v * block_len + group * GROUP_BYTES).cast()) };
        }
        for (row, sums) in rows.iter().zip(sums.iter_mut()) {
            // SAFETY: (group + 1) * GROUP <= direct_bytes == row.len(), so all four bytes are in the row.
            let x = unsafe { row.as_ptr().add(group * GROUP).cast::<i32>().read_unaligned() };
            let x = _mm512_set1_epi32(x);
            for (sum, &w) in sums.iter_mut().zip(&w) {
                *sum = _mm512_dpbusd_epi32(*sum, x, w);
            }
        }
    }
    if direct_bytes < depth {
        let group = full_groups;
        debug_assert!((VECTORS - 1) * block_len + (group + 1) * GROUP_BYTES <= weights.len());
        let mut w = [_mm512_setzero_si512(); VECTORS];
        for (v, w) in w.iter_mut().enumerate() {
            // SAFETY: a partial last group is counted in groups(depth), so its 64 bytes end within block v,
            // at most (v + 1) * block_len <= weights.len().
            *w = unsafe { _mm512_loadu_si512(weights.as_ptr().add(v * block_len + group * GROUP_BYTES).cast()) };
        }
        for (p, sums) in sums.iter_mut().enumerate() {
            let x = _mm512_set1_epi32(tile.tails[p.min(tile.valid - 1)] as i32);
            for (sum, &w) in sums.iter_mut().zip(&w) {
                *sum = _mm512_dpbusd_epi32(*sum, x, w);
            }
        }
    }

    // The epilogue indexes a copy, so that LLVM keeps `sums` itself in registers throughout the depth loop
    // rather than storing every accumulator to the stack on each step (seen with 12 x 2 and 6 x 4 tiles).
    let sums = std::hint::black_box(sums);
    let low = _mm512_set1_ps(gemm.low_limit);
    let high = _mm512_set1_ps(gemm.high_limit);
    let output_zero = _mm512_set1_epi32(gemm.output_zero);
    for v in 0..VECTORS {
        let block = first_block + v;
        // SAFETY: each is a whole [_; LANES] array, exactly the 64 bytes read.
        let (bias, factor, scale) = unsafe {
            (
                _mm512_loadu_si512(gemm.bias[block].as_ptr().cast()),
                _mm512_loadu_si512(gemm.row_sum_factor[block].as_ptr().cast()),
                _mm512_loadu_ps(gemm.scale[block].as_ptr()),
            )
        };
        let lanes = lanes_in_block(out_channels, block);
        let mask = lane_mask(lanes);
        // Loop over all PIXELS, not `valid`, so that `sums` is only indexed by constants and stays in registers.
        for (p, sums) in sums.iter().enumerate().filter(|&(p, _)| p < tile.valid) {
            let mut sum = _mm512_add_epi32(sums[v], bias);
            if gemm.needs_row_sums {
                sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(factor, _mm512_set1_epi32(tile.row_sums[p])));
            }
            let scaled = _mm512_mul_round_ps::<ROUND>(_mm512_cvt_roundepi32_ps::<ROUND>(sum), scale);
            let clamped = _mm512_min_ps(_mm512_max_ps(scaled, low), high);
            let bytes = _mm512_add_epi32(_mm512_cvt_roundps_epi32::<ROUND>(clamped), output_zero);
            let start = (tile.first_pixel + p) * out_channels + block * LANES;
            let destination = &mut output[start..start + lanes];
            // Narrowing in a register and storing 16 bytes: the narrowing store to memory is slow on Zen.
            let bytes = _mm512_cvtusepi32_epi8(bytes);
            if lanes == LANES {
                // SAFETY: destination is `lanes` == 16 bytes long, the size of the store.
                unsafe { _mm_storeu_si128(destination.as_mut_ptr().cast(), bytes) };
            } else {
                // SAFETY: the mask enables exactly `lanes` bytes, destination's length.
                unsafe { _mm_mask_storeu_epi8(destination.as_mut_ptr().cast(), mask, bytes) };
            }
        }
    }
}

/// The pixels of one AVX2 kernel call: `valid` real ones from `first_pixel`, widened by `widen_row` into
/// consecutive rows of `row_words` words.
#[cfg(target_arch = "x86_64")]
struct Avx2Tile<'a> {
    words: &'a [u32],
    row_words: usize,
    first_pixel: usize,
    valid: usize,
    row_sums: &'a [i32; MAX_TILE_PIXELS],
}

/// Computes `PIXELS` pixels (of which `tile.valid` are real; the others are zeros or an earlier tile's rows,
/// computed and dropped, so that the loop has a fixed shape) times `VECTORS` columns of output channels from
/// `first_column`, and writes the bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_tile<const PIXELS: usize, const VECTORS: usize>(
    gemm: &Gemm,
    tile: &Avx2Tile,
    first_column: usize,
    output: &mut [u8],
) {
    let out_channels = gemm.out_channels;
    let row_words = tile.row_words;
    assert!(tile.valid >= 1 && tile.valid <= PIXELS && PIXELS <= MAX_TILE_PIXELS);
    assert_eq!(row_words, pairs(gemm.depth));
    let column_len = packed_column_len(gemm.depth);
    let weights = &gemm.packed[first_column * column_len..(first_column + VECTORS) * column_len];
    let rows: [&[u32]; PIXELS] = std::array::from_fn(|p| &tile.words[p * row_words..(p + 1) * row_words]);

    let mut sums = [[_mm256_setzero_si256(); VECTORS]; PIXELS];
    for pair in 0..row_words {
        debug_assert!((VECTORS - 1) * column_len + (pair + 1) * PAIR_BYTES <= weights.len());
        let w: [__m256i; VECTORS] = std::array::from_fn(|v| {
            // SAFETY: pair < pairs(depth), so this 16-byte read ends within column v of the chunk, at most
            // (v + 1) * column_len <= weights.len().
            let bytes = unsafe { _mm_loadu_si128(weights.as_ptr().add(v * column_len + pair * PAIR_BYTES).cast()) };
            _mm256_cvtepi8_epi16(bytes)
        });
        for (row, sums) in rows.iter().zip(sums.iter_mut()) {
            debug_assert!(pair < row.len());
            // SAFETY: pair < row_words == row.len().
            let x = _mm256_set1_epi32(unsafe { *row.get_unchecked(pair) } as i32);
            for (sum, &w) in sums.iter_mut().zip(&w) {
                // Exact: u8 times s8 fits in i16 and a pair of such products in i32, where `vpmaddubsw`, summing
                // the pair in i16, would saturate.
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(x, w));
            }
        }
    }

    // As in `vnni_tile`: indexing a copy keeps `sums` itself in registers through the depth loop.
    let sums = std::hint::black_box(sums);
    let low = _mm256_set1_ps(gemm.low_limit);
    let high = _mm256_set1_ps(gemm.high_limit);
    let output_zero = _mm256_set1_epi32(gemm.output_zero);
    for v in 0..VECTORS {
        let column = first_column + v;
        let (bias, factor, scale) =
            (column_of(&gemm.bias, column), column_of(&gemm.row_sum_factor, column), column_of(&gemm.scale, column));
        // SAFETY: each is a whole [_; COLUMN_LANES] array, exactly the 32 bytes read.
        let (bias, factor, scale) = unsafe {
            (
                _mm256_loadu_si256(bias.as_ptr().cast()),
                _mm256_loadu_si256(factor.as_ptr().cast()),
                _mm256_loadu_ps(scale.as_ptr()),
            )
        };
        let lanes = lanes_in_column(out_channels, column);
        for (p, sums) in sums.iter().enumerate().filter(|&(p, _)| p < tile.valid) {
            let mut sum = _mm256_add_epi32(sums[v], bias);
            if gemm.needs_row_sums {
                sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(factor, _mm256_set1_epi32(tile.row_sums[p])));
            }
            // Both conversions round to nearest, ties to even, under the default MXCSR, which Rust code assumes
            // and never changes; the first is then the oracle's `as f32`.
            let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), scale);
            let clamped = _mm256_min_ps(_mm256_max_ps(scaled, low), high);
            let values = _mm256_add_epi32(_mm256_cvtps_epi32(clamped), output_zero);
            // The values lie in low..=high, so the saturating packs keep them; packing works within each
            // 128-bit half, whose first four bytes then hold four outputs.
            let words = _mm256_packs_epi32(values, values);
            let bytes = _mm256_packus_epi16(words, words);
            let bytes = _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256::<1>(bytes));
            let bytes = (_mm_cvtsi128_si64(bytes) as u64).to_le_bytes();
            let start = (tile.first_pixel + p) * out_channels + column * COLUMN_LANES;
            if lanes == COLUMN_LANES {
                // A fixed length, so that this is one 8-byte store rather than a call to memcpy.
                output[start..start + COLUMN_LANES].copy_from_slice(&bytes);
            } else {
                output[start..start + lanes].copy_from_slice(&bytes[..lanes]);
            }
        }
    }
}

/// `widen_row` compiled for AVX2, which it needs to run at a fraction of the kernel's time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_widen_row(row: &[u8], words: &mut [u32]) -> i32 {
    widen_row(row, words)
}

/// Puts each pair of activations into a word as two u16, the layout `vpmaddwd` multiplies with a pair of
/// weights (an odd last activation pairs with zero), and returns the row's sum.
#[inline(always)]
fn widen_row(row: &[u8], words: &mut [u32]) -> i32 {
    assert_eq!(words.len(), pairs(row.len()), "one word per pair of activations");
    let (whole, tail) = row.as_chunks::<PAIR>();
    let mut sum = 0u32;
    for (word, &[a, b]) in words.iter_mut().zip(whole) {
        *word = a as u32 | (b as u32) << 16;
        sum += a as u32 + b as u32;
    }
    if let [a] = *tail {
        words[whole.len()] = a as u32;
        sum += a as u32;
    }
    sum as i32
}

/// The sum of a row of activations, 64 bytes at a step; LLVM widens the plain sum byte by byte, which cost as
/// much as a third of the kernel's time at depth 144.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn vnni_row_sum(row: &[u8]) -> i32 {
    let mut totals = _mm512_setzero_si512();
    for start in (0..row.len()).step_by(64) {
        let len = (row.len() - start).min(64);
        debug_assert!(start + len <= row.len());
        // SAFETY: the mask enables only the `len` bytes from `start`, which lie inside the row; masked-off bytes
        // are neither read nor able to fault.
        let bytes = unsafe { _mm512_maskz_loadu_epi8(byte_mask(len), row.as_ptr().add(start).cast()) };
        totals = _mm512_add_epi64(totals, _mm512_sad_epu8(bytes, _mm512_setzero_si512()));
    }
    _mm512_reduce_add_epi64(totals) as i32
}

/// A mask enabling the first `len` of 64 bytes.
fn byte_mask(len: usize) -> u64 {
    debug_assert!(len <= 64);
    if len == 64 { u64::MAX } else { (1u64 << len) - 1 }
}

fn row_sum(row: &[u8]) -> i32 {
    row.iter().map(|&x| x as u32).sum::<u32>() as i32
}

/// Depth groups per block, counting a partial last group.
fn groups(depth: usize) -> usize {
    depth.div_ceil(GROUP)
}

/// Packed `Variant::Vnni` weight bytes per block of `LANES` output channels.
fn packed_block_len(depth: usize) -> usize {
    groups(depth) * GROUP_BYTES
}

/// Depth pairs per column, counting a lone last value as a pair.
fn pairs(depth: usize) -> usize {
    depth.div_ceil(PAIR)
}

/// Packed `Variant::Avx2` weight bytes per column of `COLUMN_LANES` output channels.
fn packed_column_len(depth: usize) -> usize {
    pairs(depth) * PAIR_BYTES
}

/// Bytes of each row the kernel reads itself: whole groups only; the rest goes through `tail_word`.
fn direct_read_len(depth: usize) -> usize {
    depth / GROUP * GROUP
}

/// The row's bytes past `direct_read_len`, zero-padded to a group, little-endian like the row itself.
#[inline]
fn tail_word(row: &[u8]) -> u32 {
    // Byte by byte: a copy of 0 to 3 bytes was a call to `memcpy` for every pixel.
    let tail = &row[direct_read_len(row.len())..];
    tail.iter().enumerate().fold(0, |word, (i, &b)| word | (b as u32) << (8 * i))
}

/// Real output channels in `block`; fewer than `LANES` only in the last block.
fn lanes_in_block(out_channels: usize, block: usize) -> usize {
    (out_channels - block * LANES).min(LANES)
}

/// Real output channels in `column`; fewer than `COLUMN_LANES` only in the last column.
fn lanes_in_column(out_channels: usize, column: usize) -> usize {
    (out_channels - column * COLUMN_LANES).min(COLUMN_LANES)
}

/// Column `column`'s share of per-channel values kept in blocks of `LANES`.
fn column_of<T>(blocks: &[[T; LANES]], column: usize) -> &[T; COLUMN_LANES] {
    const COLUMNS_PER_BLOCK: usize = LANES / COLUMN_LANES;
    let (columns, _) = blocks[column / COLUMNS_PER_BLOCK].as_chunks::<COLUMN_LANES>();
    &columns[column % COLUMNS_PER_BLOCK]
}

fn lane_mask(lanes: usize) -> u16 {
    debug_assert!(lanes <= LANES);
    ((1u32 << lanes) - 1) as u16
}

/// Splits the blocks (or columns) of output channels into runs of at most `max_vectors`, as even as possible, so
/// that no kernel call is left with a lone block while the others carry four.
fn split_into_chunks(blocks: usize, max_vectors: usize) -> Vec<Chunk> {
    let count = blocks.div_ceil(max_vectors);
    let mut chunks = Vec::with_capacity(count);
    let mut first_block = 0;
    for index in 0..count {
        let vectors = blocks / count + usize::from(index < blocks % count);
        chunks.push(Chunk { first_block, vectors });
        first_block += vectors;
    }
    chunks
}

/// Pixels per full tile for chunks up to `widest` vectors: as many as the 32 vector registers hold next to the
/// weights, so that each loaded weight vector is used that many times.
fn main_tile_pixels(widest: usize) -> usize {
    match widest {
        4 => 6,
        3 => 8,
        2 => 12,
        _ => 16,
    }
}

/// `main_tile_pixels` for AVX2's 16 vector registers: sums for each pixel and column, plus a register per
/// column for the weights, one for the activations and one for their product.
fn avx2_main_tile_pixels(widest: usize) -> usize {
    match widest {
        2 => 6,
        _ => 12,
    }
}

/// The kernel calls over `pixels` rows, in order: (first pixel, real pixels, tile size), both vector drivers' walk.
#[cfg(target_arch = "x86_64")]
fn tiles(pixels: usize, main_tile_pixels: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut first_pixel = 0;
    std::iter::from_fn(move || {
        (first_pixel < pixels).then(|| {
            let tile_pixels = tile_pixels(pixels - first_pixel, main_tile_pixels);
            let valid = (pixels - first_pixel).min(tile_pixels);
            let tile = (first_pixel, valid, tile_pixels);
            first_pixel += valid;
            tile
        })
    })
}

/// Pixels of the next kernel call: a full tile while enough remain, then tiles of four (their unused pixels
/// repeat a real one), and a single pixel alone, so a fully connected layer does not pay for a whole tile.
fn tile_pixels(remaining: usize, main_tile_pixels: usize) -> usize {
    if remaining >= main_tile_pixels {
        main_tile_pixels
    } else if remaining >= 2 {
        4
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Rng;
    use super::*;

    /// The exact semantics, written as plainly as possible.
    #[allow(clippy::too_many_arguments)]
    fn oracle(
        out_channels: usize,
        depth: usize,
        weights: &[u8],
        signed: bool,
        weight_zero: &[i32],
        input_zero: i32,
        bias: &[i32],
        requantize: &Requantize,
        input: &[u8],
        pixels: usize,
    ) -> Vec<u8> {
        let mut output = vec![0u8; pixels * out_channels];
        for p in 0..pixels {
            for o in 0..out_channels {
                let mut acc = bias[o];
                for k in 0..depth {
                    let x = input[p * depth + k] as i32;
                    let byte = weights[o * depth + k];
                    let w = if signed { byte as i8 as i32 } else { byte as i32 };
                    acc += (x - input_zero) * (w - weight_zero[o]);
                }
                let rounded = (acc as f32 * requantize.scale[o]).round_ties_even() as i64;
                let value =
                    (rounded + requantize.output_zero as i64).clamp(requantize.low as i64, requantize.high as i64);
                output[p * out_channels + o] = value as u8;
            }
        }
        output
    }

    fn variants() -> Vec<Variant> {
        Variant::ALL.iter().copied().filter(|v| v.is_available()).collect()
    }

    #[derive(Debug, Clone, Copy)]
    enum Values {
        Random,
        /// All activations 255 and every weight at its most negative (signed) or largest (unsigned) value.
        Extreme,
        /// Values within 3 of their zero points and a small bias, so that sums are small and a scale of 0.5
        /// lands many of them on halves.
        NearZero,
    }

    #[derive(Debug, Clone)]
    struct Case {
        out_channels: usize,
        depth: usize,
        pixels: usize,
        signed: bool,
        input_zero: i32,
        values: Values,
        /// Scale times this is roughly the spread of the sums over the output range; large clamps a lot.
        scale_factor: f32,
        low: u8,
        high: u8,
        seed: u64,
    }

    fn check(case: &Case) {
        let Case { out_channels, depth, pixels, signed, input_zero, values, scale_factor, low, high, seed } =
            case.clone();
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let weight_zero: Vec<i32> = (0..out_channels).map(|_| if signed { 0 } else { rng.below(256) as i32 }).collect();
        let near = |zero: i32, offset: u64| (zero + offset as i32 - 3).clamp(0, 255) as u8;
        let (weights, input): (Vec<u8>, Vec<u8>) = match values {
            Values::Random => (
                (0..out_channels * depth).map(|_| rng.byte()).collect(),
                (0..pixels * depth).map(|_| rng.byte()).collect(),
            ),
            Values::Extreme => (vec![if signed { 0x80 } else { 255 }; out_channels * depth], vec![255; pixels * depth]),
            Values::NearZero => (
                (0..out_channels * depth)
                    .map(|i| {
                        if signed {
                            (rng.below(7) as i8 - 3) as u8
                        } else {
                            near(weight_zero[i / depth], rng.below(7) as u64)
                        }
                    })
                    .collect(),
                (0..pixels * depth).map(|_| near(input_zero, rng.below(7) as u64)).collect(),
            ),
        };
        let bias: Vec<i32> = match values {
            Values::NearZero => (0..out_channels).map(|_| rng.below(41) as i32 - 20).collect(),
            _ => (0..out_channels).map(|_| rng.below(20001) as i32 - 10000).collect(),
        };
        // Sums spread roughly like 128 * 128 * sqrt(depth); aim that spread at the byte range.
        let spread = 128.0 * 128.0 * (depth as f32).sqrt();
        let scale: Vec<f32> = match values {
            Values::NearZero => vec![0.5; out_channels],
            _ => (0..out_channels)
                .map(|_| scale_factor * (0.5 + rng.below(1000) as f32 / 1000.0) * 128.0 / spread)
                .collect(),
        };
        let requantize = Requantize { scale, output_zero: rng.below(256) as i32, low, high };
        let expected =
            oracle(out_channels, depth, &weights, signed, &weight_zero, input_zero, &bias, &requantize, &input, pixels);
        for variant in variants() {
            let gemm = Gemm::with_variant(
                out_channels,
                depth,
                &weights,
                signed,
                &weight_zero,
                input_zero,
                &bias,
                requantize.clone(),
                variant,
            );
            let mut output = vec![0xAB; pixels * out_channels];
            gemm.run(&input, pixels, &mut output);
            if let Some(i) = (0..output.len()).find(|&i| output[i] != expected[i]) {
                panic!(
                    "{variant:?} {case:?}: pixel {} channel {}: got {} expected {}",
                    i / out_channels,
                    i % out_channels,
                    output[i],
                    expected[i]
                );
            }
        }
    }

    /// Cycles the parameters that do not change the shape, so that many shapes see each of them.
    fn case(index: usize, out_channels: usize, depth: usize, pixels: usize) -> Case {
        let (low, high) = if index % 5 == 4 { (20, 200) } else { (0, 255) };
        Case {
            out_channels,
            depth,
            pixels,
            signed: index.is_multiple_of(2),
            input_zero: [0, 128, 255][index / 2 % 3],
            values: Values::Random,
            scale_factor: [1.0, 0.1, 10.0][index / 6 % 3],
            low,
            high,
            seed: index as u64 + 1,
        }
    }

    #[test]
    fn small_depths_and_channel_tails() {
        let mut index = 0;
        for depth in (1..=40).chain([96]) {
            for out_channels in [1, 15, 16, 17, 33, 64, 65] {
                for pixels in (1..=9).chain([49]) {
                    check(&case(index, out_channels, depth, pixels));
                    index += 1;
                }
            }
        }
    }

    #[test]
    fn first_convolution_depth_27() {
        for (index, out_channels) in [16, 24, 32, 33].into_iter().enumerate() {
            for pixels in [1, 5, 13, 100] {
                check(&case(index * 7 + pixels, out_channels, 27, pixels));
            }
        }
    }

    #[test]
    fn large_depths() {
        let mut index = 0;
        for depth in [960, 1280, 1283] {
            for out_channels in [1, 17, 33] {
                for pixels in [1, 2, 5, 9, 49] {
                    check(&case(index, out_channels, depth, pixels));
                    index += 1;
                }
            }
        }
    }

    #[test]
    fn fully_connected_shape() {
        for index in 0..6 {
            check(&case(index, 1000, 1280, 1 + index % 3));
        }
    }

    #[test]
    fn every_tile_size_and_pixel_tail() {
        // Blocks 1..=13 give chunks of every width, with tiles of 6, 8, 12 and 16 pixels.
        let mut index = 0;
        for blocks in 1..=13 {
            for pixels in [11, 12, 13, 17, 23, 100] {
                check(&case(index, blocks * 16 - 3, 19, pixels));
                index += 1;
            }
        }
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        for (index, depth) in [1, 27, 96, 960, 1280, 1283].into_iter().enumerate() {
            for signed in [true, false] {
                for input_zero in [0, 128, 255] {
                    let mut case = case(index, 33, depth, 7);
                    case.signed = signed;
                    case.input_zero = input_zero;
                    case.values = Values::Extreme;
                    // Sums reach 255 * 255 * depth; keep some results inside the range.
                    case.scale_factor = 0.01;
                    check(&case);
                }
            }
        }
    }

    #[test]
    fn clamping_at_low_and_high() {
        for (index, depth) in [8, 27, 96].into_iter().enumerate() {
            let mut case = case(index, 40, depth, 9);
            case.scale_factor = 100.0;
            case.low = 37;
            case.high = 201;
            check(&case);
            case.low = 90;
            case.high = 90;
            check(&case);
        }
    }

    #[test]
    fn ties_round_to_even() {
        // Depth 1, weight 1, activation 1 and zero points 0: the sum is bias + 1, times 0.5 lands on halves.
        let sums = [1, 3, 5, 7, -1, -3, -5, 2, 0, 9, 11, 13, 15, 17, 19, 21, 23];
        let bias: Vec<i32> = sums.iter().map(|s| s - 1).collect();
        let expected: Vec<u8> =
            [0i32, 2, 2, 4, 0, -2, -2, 1, 0, 4, 6, 6, 8, 8, 10, 10, 12].iter().map(|r| (r + 10) as u8).collect();
        let out_channels = sums.len();
        for variant in variants() {
            for signed in [true, false] {
                let weights = vec![1u8; out_channels];
                let requantize = Requantize { scale: vec![0.5; out_channels], output_zero: 10, low: 0, high: 255 };
                let gemm = Gemm::with_variant(
                    out_channels,
                    1,
                    &weights,
                    signed,
                    &vec![0; out_channels],
                    0,
                    &bias,
                    requantize,
                    variant,
                );
                let mut output = vec![0; 2 * out_channels];
                gemm.run(&[1, 1], 2, &mut output);
                assert_eq!(&output[..out_channels], &expected[..], "{variant:?} signed {signed}");
                assert_eq!(&output[out_channels..], &expected[..], "{variant:?} signed {signed}");
            }
        }
    }

    #[test]
    fn random_ties_match_the_oracle() {
        for index in 0..12 {
            let mut case = case(index, 17 + index, 5 + index, 7);
            case.values = Values::NearZero;
            check(&case);
        }
    }

    #[test]
    fn sizes_and_empty_input() {
        let requantize = Requantize { scale: vec![1.0; 3], output_zero: 0, low: 0, high: 255 };
        let gemm = Gemm::new(3, 5, &[0; 15], true, &[0; 3], 0, &[7, 8, 9], requantize);
        assert_eq!((gemm.out_channels, gemm.depth), (3, 5));
        gemm.run(&[], 0, &mut []);
        let mut output = [0; 3];
        gemm.run(&[0; 5], 1, &mut output);
        assert_eq!(output, [7, 8, 9]);
    }

    #[test]
    #[should_panic(expected = "input must be pixels x depth")]
    fn wrong_input_length_panics() {
        let requantize = Requantize { scale: vec![1.0; 3], output_zero: 0, low: 0, high: 255 };
        let gemm = Gemm::new(3, 5, &[0; 15], true, &[0; 3], 0, &[0; 3], requantize);
        gemm.run(&[0; 9], 2, &mut [0; 6]);
    }

    #[test]
    fn fast_path_is_chosen_when_available() {
        #[cfg(target_arch = "x86_64")]
        {
            let vnni = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni");
            let avx2 = is_x86_feature_detected!("avx2");
            assert_eq!(Variant::Vnni.is_available(), vnni);
            assert_eq!(Variant::Avx2.is_available(), avx2);
            let expected = if vnni {
                Variant::Vnni
            } else if avx2 {
                Variant::Avx2
            } else {
                Variant::Portable
            };
            assert_eq!(Variant::best(), expected);
        }
        assert!(Variant::Portable.is_available());
    }

    #[test]
    fn read_bounds() {
        for depth in 0..=70 {
            let direct = direct_read_len(depth);
            assert!(direct <= depth && depth - direct < GROUP && direct.is_multiple_of(GROUP));
            // Whole groups read directly plus the tail word cover the row exactly once.
            assert_eq!(groups(depth), direct / GROUP + usize::from(direct < depth));
            assert_eq!(packed_block_len(depth), groups(depth) * 64);
        }
        assert_eq!(tail_word(&[1, 2, 3, 4, 5, 6, 7]), u32::from_le_bytes([5, 6, 7, 0]));
        assert_eq!(tail_word(&[1, 2, 3, 4]), 0);
        assert_eq!(tail_word(&[9]), 9);
        assert_eq!(tail_word(&[]), 0);
        for depth in 0..=70 {
            // Whole pairs plus a lone last value, once each, all in the packed column.
            assert_eq!(pairs(depth) * PAIR, depth + depth % PAIR);
            assert_eq!(packed_column_len(depth), pairs(depth) * 16);
        }
    }

    #[test]
    fn widened_rows() {
        let mut words = [0xDEAD; 3];
        assert_eq!(widen_row(&[1, 2, 3, 255, 7], &mut words), 268);
        assert_eq!(words, [1 | 2 << 16, 3 | 255 << 16, 7]);
        let mut words = [0xDEAD; 2];
        assert_eq!(widen_row(&[9, 8, 7, 6], &mut words), 30);
        assert_eq!(words, [9 | 8 << 16, 7 | 6 << 16]);
        assert_eq!(widen_row(&[], &mut []), 0);
    }

    #[test]
    #[should_panic(expected = "one word per pair of activations")]
    fn widening_into_the_wrong_length_panics() {
        widen_row(&[1, 2, 3], &mut [0; 1]);
    }

    #[test]
    fn row_sums_agree() {
        assert_eq!(byte_mask(0), 0);
        assert_eq!(byte_mask(3), 0b111);
        assert_eq!(byte_mask(64), u64::MAX);
        let mut rng = Rng(7);
        let bytes: Vec<u8> = (0..2000).map(|_| rng.byte()).collect();
        for len in (0..=200).chain([1280, 2000]) {
            let row = &bytes[..len];
            let expected: i32 = row.iter().map(|&x| x as i32).sum();
            assert_eq!(row_sum(row), expected);
            let mut words = vec![0; pairs(len)];
            assert_eq!(widen_row(row, &mut words), expected);
            #[cfg(target_arch = "x86_64")]
            if Variant::Vnni.is_available() {
                // SAFETY: is_available() detected the features vnni_row_sum is compiled for.
                assert_eq!(unsafe { vnni_row_sum(row) }, expected, "length {len}");
            }
            #[cfg(target_arch = "x86_64")]
            if Variant::Avx2.is_available() {
                let mut avx2_words = vec![0; pairs(len)];
                // SAFETY: is_available() detected the features avx2_widen_row is compiled for.
                assert_eq!(unsafe { avx2_widen_row(row, &mut avx2_words) }, expected, "length {len}");
                assert_eq!(avx2_words, words);
            }
        }
        assert_eq!(row_sum(&[255; 1280]), 255 * 1280);
    }

    #[test]
    fn store_bounds() {
        assert_eq!(lanes_in_block(17, 0), 16);
        assert_eq!(lanes_in_block(17, 1), 1);
        assert_eq!(lanes_in_block(32, 1), 16);
        assert_eq!(lane_mask(16), 0xFFFF);
        assert_eq!(lane_mask(1), 1);
        assert_eq!(lane_mask(0), 0);
        for out_channels in 1..=200usize {
            let blocks = out_channels.div_ceil(LANES);
            let total: usize = (0..blocks).map(|b| lanes_in_block(out_channels, b)).sum();
            assert_eq!(total, out_channels);
            let columns = out_channels.div_ceil(COLUMN_LANES);
            let total: usize = (0..columns).map(|c| lanes_in_column(out_channels, c)).sum();
            assert_eq!(total, out_channels);
            // Every column's values lie in the blocks padded for the 16-lane layout.
            assert!(columns.div_ceil(LANES / COLUMN_LANES) <= blocks);
        }
        assert_eq!(lanes_in_column(17, 2), 1);
        assert_eq!(lanes_in_column(16, 1), 8);
        let blocks: Vec<[usize; LANES]> = (0..3).map(|b| std::array::from_fn(|lane| b * LANES + lane)).collect();
        for column in 0..6 {
            let expected: [usize; COLUMN_LANES] = std::array::from_fn(|lane| column * COLUMN_LANES + lane);
            assert_eq!(column_of(&blocks, column), &expected);
        }
    }

    #[test]
    fn chunks_cover_every_block_once_with_kernels_to_run_them() {
        for blocks in 0..=100 {
            let chunks = split_into_chunks(blocks, MAX_VECTORS);
            let mut next = 0;
            for chunk in &chunks {
                assert_eq!(chunk.first_block, next);
                assert!((1..=MAX_VECTORS).contains(&chunk.vectors));
                next += chunk.vectors;
            }
            assert_eq!(next, blocks);
            let widest = chunks.iter().map(|c| c.vectors).max().unwrap_or(1);
            let main = main_tile_pixels(widest);
            assert!(main * widest + widest < 32 && main <= MAX_TILE_PIXELS);
            for remaining in 1..=100 {
                let tile = tile_pixels(remaining, main);
                assert!([1, 4, 6, 8, 12, 16].contains(&tile) && tile <= MAX_TILE_PIXELS);
                assert!(tile == main || remaining < main);
            }
        }
    }

    #[test]
    fn avx2_chunks_cover_every_column_once_in_registers() {
        // The (pixels, vectors) pairs `avx2_dispatch` has kernels for.
        let kernels = [(1, 1), (1, 2), (4, 1), (4, 2), (6, 1), (6, 2), (12, 1)];
        for columns in 0..=100 {
            let chunks = split_into_chunks(columns, AVX2_MAX_VECTORS);
            let mut next = 0;
            for chunk in &chunks {
                assert_eq!(chunk.first_block, next);
                assert!((1..=AVX2_MAX_VECTORS).contains(&chunk.vectors));
                next += chunk.vectors;
            }
            assert_eq!(next, columns);
            let widest = chunks.iter().map(|c| c.vectors).max().unwrap_or(1);
            let main = avx2_main_tile_pixels(widest);
            for remaining in 1..=100 {
                let tile = tile_pixels(remaining, main);
                assert!(tile == main || remaining < main);
                for chunk in &chunks {
                    // Sums, weights, the broadcast activation and a product in 16 registers, and a kernel to run them.
                    assert!(tile * chunk.vectors + chunk.vectors + 2 <= 16);
                    assert!(kernels.contains(&(tile, chunk.vectors)), "{tile} x {}", chunk.vectors);
                }
                // `run_avx2` keeps widened rows for the larger of the main tile and 4.
                assert!(tile <= main.max(4) && tile <= MAX_TILE_PIXELS);
            }
        }
    }

    #[test]
    #[ignore = "benchmark: cargo test --release -- --ignored --nocapture bench"]
    fn bench() {
        let shapes = [
            (12544, 16, 96),
            (12544, 32, 16),
            (3136, 144, 24),
            (3136, 24, 144),
            (784, 192, 64),
            (784, 192, 32),
            (196, 384, 64),
            (49, 960, 160),
            (49, 320, 1280),
            (1, 1280, 1000),
        ];
        for (pixels, depth, out_channels) in shapes {
            let mut rng = Rng(12345);
            let weights: Vec<u8> = (0..out_channels * depth).map(|_| rng.byte()).collect();
            let input: Vec<u8> = (0..pixels * depth).map(|_| rng.byte()).collect();
            let bias: Vec<i32> = (0..out_channels).map(|_| rng.below(1000) as i32).collect();
            let requantize = Requantize { scale: vec![0.001; out_channels], output_zero: 3, low: 0, high: 255 };
            let mut line = format!("{pixels:>5} x {depth:>4} x {out_channels:>4}:");
            for variant in variants() {
                for signed in [true, false] {
                    let weight_zero = vec![if signed { 0 } else { 120 }; out_channels];
                    let gemm = Gemm::with_variant(
                        out_channels,
                        depth,
                        &weights,
                        signed,
                        &weight_zero,
                        128,
                        &bias,
                        requantize.clone(),
                        variant,
                    );
                    let mut output = vec![0; pixels * out_channels];
                    let macs = (pixels * depth * out_channels) as f64;
                    let runs = ((2e9 / macs) as usize).clamp(3, 20000);
                    gemm.run(&input, pixels, &mut output);
                    let start = std::time::Instant::now();
                    for _ in 0..runs {
                        gemm.run(std::hint::black_box(&input), pixels, &mut output);
                    }
                    let ns = start.elapsed().as_nanos() as f64 / runs as f64;
                    let kind = if signed { "s8" } else { "u8" };
                    line += &format!("  {variant:?}/{kind} {ns:>10.0} ns {:>6.1} GMAC/s", macs / ns);
                }
            }
            println!("{line}");
        }
    }
}
