//! Quantized depthwise convolution (depth multiplier 1) over channels-last u8 activations, with
//! TFLite/XNNPACK's fp32 requantization.
//!
//! Sums are kept in wrapping i32 arithmetic, as the vector hardware does, so that folding the input
//! zero point into the bias gives exactly the same bits as subtracting it per tap.

use std::ops::Range;

use super::Requantize;

/// Channels handled together: one AVX-512 vector of i32.
const LANES: usize = 16;

/// 1.5 * 2^23: adding it to a float of magnitude below 2^22 gives a float whose unit in the last place
/// is 1, so the addition itself rounds ties-to-even and leaves the integer in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: i32 = 0x4B40_0000;

/// Keeps `low - output_zero` and `high - output_zero` well inside the magic-number trick's range.
const MAX_OUTPUT_ZERO: u32 = 1 << 16;

/// Keeps `w - weight_zero` inside i16 for u8 and i8 weights.
const MAX_WEIGHT_ZERO: u32 = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub channels: usize,
    /// (h, w)
    pub input: (usize, usize),
    pub output: (usize, usize),
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    /// Rows above, columns left.
    pub pad: (usize, usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Portable,
    Avx2,
    Avx512,
    /// Avx512, with 3x3 interiors in groups of 64 channels on `vpdpbusd`.
    Vnni,
}

impl Variant {
    fn best() -> Variant {
        [Variant::Vnni, Variant::Avx512, Variant::Avx2]
            .into_iter()
            .find(|variant| variant.available())
            .unwrap_or(Variant::Portable)
    }

    fn available(self) -> bool {
        match self {
            Variant::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"),
            #[cfg(target_arch = "x86_64")]
            Variant::Vnni => Variant::Avx512.available() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Requantization constants, shifted so that clamping happens before rounding, in f32.
#[derive(Debug, Clone, Copy)]
struct Clamp {
    low: f32,
    high: f32,
    magic_minus_zero: i32,
}

/// Blocks of `LANES` channels in one group of [`Wide`].
const GROUP_BLOCKS: usize = 4;
/// Channels in one group of [`Wide`]: one 64-byte load of a pixel.
const GROUP: usize = GROUP_BLOCKS * LANES;

/// A 3x3 kernel's interior on `vpdpbusd`, 64 channels at a time. The three
/// rows of one input column, channel by channel, make the four bytes that a
/// lane of `vpdpbusd` multiplies and sums, so that one instruction does a
/// column of taps for 16 channels, and a column, once arranged, serves every
/// output whose window holds it (three at stride 1).
///
/// `vpdpbusd` multiplies unsigned bytes by signed ones. A weight `v = w -
/// weight_zero` may not fit a signed byte, but `v + c` fits an unsigned one
/// for some `c` in 0..=255 when the zero point lies within the channel's
/// weights (a channel's weights span at most 255), so the weights go in as
/// `v + c` and the inputs as `x - 128`:
/// `sum v x = sum (v + c)(x - 128) - c sum (x - 128) + 128 sum v`.
///
/// The lanes are not the channels in order: arranging the bytes with
/// interleaves within 128-bit lanes puts channel `16 k + 4 j + m` in lane
/// `4 k + m` of the `j`th of a group's four vectors, and the same interleaves
/// run backwards (the packs that narrow the results) put the bytes back in
/// order. Every table below is in that order.
#[derive(Debug, Default)]
struct Wide {
    /// Whole groups of 64 channels; 0 where the geometry is not a 3x3 kernel
    /// at stride 1 or 2.
    groups: usize,
    /// `v + c` by [group * 4 + j][kx]: four bytes a lane, the rows ky = 0, 1, 2
    /// and a zero.
    weights: Vec<[[u8; GROUP]; 3]>,
    /// `c` by [group * 4 + j], as the weights are: for the rows' sum times `c` in one `vpdpbusd`.
    shift: Vec<[u8; GROUP]>,
    /// The interior's bias plus `128 sum v`, by [group * 4 + j].
    bias: Vec<[i32; LANES]>,
    scale: Vec<[f32; LANES]>,
}

impl Wide {
    /// `weights`: `w - weight_zero` by [tap][channel]; `bias` and `scale`: the interior's, by block of `LANES`.
    fn new(geometry: &Geometry, weights: &[i16], bias: &[[i32; LANES]], scale: &[[f32; LANES]]) -> Wide {
        let channels = geometry.channels;
        let strides = 1..=2;
        if geometry.kernel != (3, 3) || !strides.contains(&geometry.stride.0) || !strides.contains(&geometry.stride.1) {
            return Wide::default();
        }
        let weight = |tap: usize, channel: usize| i32::from(weights[tap * channels + channel]);
        // `c`: as small as keeps every `v + c` at 0 or more, and never below 0 (it is an unsigned byte too).
        let shift = |channel: usize| (0..9).map(|tap| -weight(tap, channel)).max().unwrap_or(0).max(0);
        let spans_a_byte =
            |channel: usize| shift(channel) <= 255 && (0..9).all(|tap| weight(tap, channel) + shift(channel) <= 255);
        // Any channel of u8 or i8 weights less a zero point within their range does; the check keeps others out.
        let groups = (0..channels / GROUP).take_while(|g| (g * GROUP..(g + 1) * GROUP).all(spans_a_byte)).count();
        let channel = |vector: usize, lane: usize| {
            let (group, j) = (vector / GROUP_BLOCKS, vector % GROUP_BLOCKS);
            group * GROUP + 16 * (lane / 4) + 4 * j + lane % 4
        };
        let vectors = groups * GROUP_BLOCKS;
        let weights = (0..vectors)
            .map(|vector| {
                std::array::from_fn(|kx| {
                    std::array::from_fn(|byte| {
                        let (lane, ky) = (byte / 4, byte % 4);
                        let c = channel(vector, lane);
                        if ky == 3 { 0 } else { (weight(ky * 3 + kx, c) + shift(c)) as u8 }
                    })
                })
            })
            .collect();
        let shift = (0..vectors)
            .map(|vector| {
                std::array::from_fn(|byte| if byte % 4 == 3 { 0 } else { shift(channel(vector, byte / 4)) as u8 })
            })
            .collect();
        let bias = (0..vectors)
            .map(|vector| {
                std::array::from_fn(|lane| {
                    let c = channel(vector, lane);
                    let sum = (0..9).fold(0i32, |sum, tap| sum.wrapping_add(weight(tap, c)));
                    bias[c / LANES][c % LANES].wrapping_add(sum.wrapping_mul(128))
                })
            })
            .collect();
        let scale = (0..vectors)
            .map(|vector| {
                std::array::from_fn(|lane| {
                    let c = channel(vector, lane);
                    scale[c / LANES][c % LANES]
                })
            })
            .collect();
        Wide { groups, weights, shift, bias, scale }
    }
}

#[derive(Debug)]
pub struct Depthwise {
    geometry: Geometry,
    variant: Variant,
    input_zero: i32,
    /// `w - weight_zero`, [tap][channel], for border pixels and for channels past the last whole block.
    weights: Vec<i16>,
    bias: Vec<i32>,
    scale: Vec<f32>,
    /// Channels in whole blocks of `LANES`.
    blocks: usize,
    /// The same weights for the interior fast path, [block][tap].
    block_weights: Vec<[i16; LANES]>,
    /// `bias - input_zero * sum over taps (w - weight_zero)`: right only where every tap is inside the input.
    block_bias: Vec<[i32; LANES]>,
    block_scale: Vec<[f32; LANES]>,
    /// Bytes from a window's first tap to each tap, in tap order.
    tap_offsets: Vec<usize>,
    /// The 3x3 interiors' groups of 64 channels, for [`Variant::Vnni`].
    wide: Wide,
    /// Output rows and columns whose windows lie wholly inside the input.
    rows: Range<usize>,
    columns: Range<usize>,
    clamp: Clamp,
}

impl Depthwise {
    /// `weights`: TFLite's layout [kernel_h][kernel_w][channels] bytes, read as i8 when `signed`, else u8;
    /// `weight_zero`: one zero point per channel (0 for symmetric int8); `input_zero`: the activations' zero point;
    /// `bias`: one int32 per channel. Returns an error String if the geometry is inconsistent
    /// (zero sizes, output larger than the padded input allows, etc.) instead of panicking.
    pub fn new(
        geometry: Geometry,
        weights: &[u8],
        signed: bool,
        weight_zero: &[i32],
        input_zero: i32,
        bias: &[i32],
        requantize: Requantize,
    ) -> Result<Depthwise, String> {
        check_geometry(&geometry)?;
        let channels = geometry.channels;
        let taps = geometry.kernel.0 * geometry.kernel.1;
        let lengths = [
            ("weights", weights.len(), taps * channels),
            ("weight zero points", weight_zero.len(), channels),
            ("bias", bias.len(), channels),
            ("scales", requantize.scale.len(), channels),
        ];
        for (name, got, expected) in lengths {
            if got != expected {
                return Err(format!("{got} {name} given, {expected} expected"));
            }
        }
        if !(0..=255).contains(&input_zero) {
            return Err(format!("input zero point {input_zero} is outside 0..=255"));
        }
        if let Some(zero) = weight_zero.iter().find(|zero| zero.unsigned_abs() > MAX_WEIGHT_ZERO) {
            return Err(format!("weight zero point {zero} is outside -{MAX_WEIGHT_ZERO}..={MAX_WEIGHT_ZERO}"));
        }
        if let Some(scale) = requantize.scale.iter().find(|scale| !scale.is_finite()) {
            return Err(format!("scale {scale} is not finite"));
        }
        if requantize.low > requantize.high {
            return Err(format!("clamp low {} is above high {}", requantize.low, requantize.high));
        }
        let output_zero = requantize.output_zero;
        if output_zero.unsigned_abs() > MAX_OUTPUT_ZERO {
            return Err(format!("output zero point {output_zero} is outside -{MAX_OUTPUT_ZERO}..={MAX_OUTPUT_ZERO}"));
        }

        let weights: Vec<i16> = weights
            .iter()
            .enumerate()
            .map(|(index, &byte)| {
                let weight = if signed { i32::from(byte as i8) } else { i32::from(byte) };
                // Fits: |weight| <= 255 and |zero| <= MAX_WEIGHT_ZERO.
                (weight - weight_zero[index % channels]) as i16
            })
            .collect();
        let blocks = channels / LANES;
        let lanes = |block: usize, value: &dyn Fn(usize) -> i32| -> [i32; LANES] {
            std::array::from_fn(|lane| value(block * LANES + lane))
        };
        let block_weights = (0..blocks)
            .flat_map(|block| (0..taps).map(move |tap| (block, tap)))
            .map(|(block, tap)| std::array::from_fn(|lane| weights[tap * channels + block * LANES + lane]))
            .collect();
        let block_bias: Vec<[i32; LANES]> = (0..blocks)
            .map(|block| {
                lanes(block, &|channel| {
                    let weight_sum =
                        (0..taps).fold(0i32, |sum, tap| sum.wrapping_add(i32::from(weights[tap * channels + channel])));
                    bias[channel].wrapping_sub(input_zero.wrapping_mul(weight_sum))
                })
            })
            .collect();
        let block_scale: Vec<[f32; LANES]> =
            (0..blocks).map(|block| std::array::from_fn(|lane| requantize.scale[block * LANES + lane])).collect();
        let (input_h, input_w) = geometry.input;
        let tap_offsets = (0..geometry.kernel.0)
            .flat_map(|ky| (0..geometry.kernel.1).map(move |kx| (ky * input_w + kx) * channels))
            .collect();
        let rows = interior_range(geometry.output.0, input_h, geometry.kernel.0, geometry.stride.0, geometry.pad.0);
        let columns = interior_range(geometry.output.1, input_w, geometry.kernel.1, geometry.stride.1, geometry.pad.1);
        let clamp = Clamp {
            low: (i32::from(requantize.low) - output_zero) as f32,
            high: (i32::from(requantize.high) - output_zero) as f32,
            magic_minus_zero: MAGIC_BITS - output_zero,
        };
        let wide = Wide::new(&geometry, &weights, &block_bias, &block_scale);
        Ok(Depthwise {
            geometry,
            variant: Variant::best(),
            wide,
            input_zero,
            weights,
            bias: bias.to_vec(),
            scale: requantize.scale,
            blocks,
            block_weights,
            block_bias,
            block_scale,
            tap_offsets,
            rows,
            columns,
            clamp,
        })
    }

    #[cfg(test)]
    fn with_variant(mut self, variant: Variant) -> Depthwise {
        assert!(variant.available(), "{variant:?} is not available on this machine");
        self.variant = variant;
        self
    }

    /// `input`: h*w*channels u8; `output`: oh*ow*channels u8. Panics (assert!) if the lengths do not match.
    pub fn run(&self, input: &[u8], output: &mut [u8]) {
        let g = &self.geometry;
        assert_eq!(input.len(), g.input.0 * g.input.1 * g.channels, "input length");
        assert_eq!(output.len(), g.output.0 * g.output.1 * g.channels, "output length");
        match self.variant {
            // SAFETY: `Avx512` is only chosen after `available()` detected avx512f and avx512bw.
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => unsafe { self.run_avx512(input, output) },
            // SAFETY: `Vnni` is only chosen after `available()` detected avx512f, avx512bw and avx512vnni.
            #[cfg(target_arch = "x86_64")]
            Variant::Vnni => unsafe { self.run_vnni(input, output) },
            // SAFETY: `Avx2` is only chosen after `available()` detected avx2.
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => unsafe { self.run_avx2(input, output) },
            _ => self.run_portable(input, output),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn run_avx512(&self, input: &[u8], output: &mut [u8]) {
        self.run_any(input, output, |input, output, oy| self.interior_row_avx512(input, output, oy, 0..self.blocks))
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn run_vnni(&self, input: &[u8], output: &mut [u8]) {
        self.run_any(input, output, |input, output, oy| {
            for group in 0..self.wide.groups {
                self.interior_group_vnni(input, output, oy, group);
            }
            self.interior_row_avx512(input, output, oy, self.wide.groups * GROUP_BLOCKS..self.blocks);
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn run_avx2(&self, input: &[u8], output: &mut [u8]) {
        self.run_any(input, output, |input, output, oy| self.interior_row(input, output, oy))
    }

    fn run_portable(&self, input: &[u8], output: &mut [u8]) {
        self.run_any(input, output, |input, output, oy| self.interior_row(input, output, oy))
    }

    /// Inlined into each variant so that LLVM vectorizes it for that variant's instruction set. `interior_row`
    /// computes the whole blocks of channels over the interior columns of an interior output row.
    #[inline(always)]
    fn run_any(&self, input: &[u8], output: &mut [u8], interior_row: impl Fn(&[u8], &mut [u8], usize)) {
        let (output_h, output_w) = self.geometry.output;
        let channels = self.geometry.channels;
        let tail = self.blocks * LANES..channels;
        let mut sums = vec![0; channels];
        for oy in 0..output_h {
            if !self.rows.contains(&oy) || self.columns.is_empty() {
                for ox in 0..output_w {
                    self.general_pixel(input, output, (oy, ox), 0..channels, &mut sums);
                }
                continue;
            }
            for ox in (0..self.columns.start).chain(self.columns.end..output_w) {
                self.general_pixel(input, output, (oy, ox), 0..channels, &mut sums);
            }
            interior_row(input, output, oy);
            if !tail.is_empty() {
                for ox in self.columns.clone() {
                    self.general_pixel(input, output, (oy, ox), tail.clone(), &mut sums);
                }
            }
        }
    }

    #[inline(always)]
    fn interior_row(&self, input: &[u8], output: &mut [u8], oy: usize) {
        for block in 0..self.blocks {
            let taps = self.tap_offsets.len();
            let weights = &self.block_weights[block * taps..][..taps];
            // A fixed tap count lets LLVM unroll the taps and keep the weights in registers.
            if let (Ok(weights), Ok(offsets)) =
                (<&[_; 9]>::try_from(weights), <&[usize; 9]>::try_from(&self.tap_offsets[..]))
            {
                self.interior_span(input, output, oy, block, weights, offsets);
            } else {
                self.interior_span(input, output, oy, block, weights, &self.tap_offsets);
            }
        }
    }

    /// One block of channels over the interior columns of output row `oy`, which must be an interior row.
    #[inline(always)]
    fn interior_span(
        &self,
        input: &[u8],
        output: &mut [u8],
        oy: usize,
        block: usize,
        weights: &[[i16; LANES]],
        offsets: &[usize],
    ) {
        let g = &self.geometry;
        let channels = g.channels;
        let output_w = g.output.1;
        let window_row = (oy * g.stride.0 - g.pad.0) * g.input.1;
        let window_start = |ox: usize| (window_row + ox * g.stride.1 - g.pad.1) * channels + block * LANES;
        // Reads grow with the column and the tap offset, so the last column's last tap bounds them all:
        // checking it once here lets the per-tap reads below skip their checks.
        let furthest = window_start(self.columns.end - 1) + offsets.iter().max().unwrap_or(&0) + LANES;
        assert!(furthest <= input.len(), "interior span reads past the input");
        assert_eq!(weights.len(), offsets.len());
        let bias = self.block_bias[block];
        let scale = &self.block_scale[block];
        for ox in self.columns.clone() {
            let start = window_start(ox);
            let mut sums = bias;
            for (weight, &offset) in weights.iter().zip(offsets) {
                let at = start + offset;
                debug_assert!(at + LANES <= furthest);
                // SAFETY: `at + LANES <= furthest <= input.len()`: ox < columns.end and offset <= the largest offset,
                // and `furthest` was asserted against the input length above.
                let pixel: &[u8; LANES] = unsafe { input.get_unchecked(at..at + LANES) }.try_into().unwrap();
                for lane in 0..LANES {
                    sums[lane] = sums[lane].wrapping_add(i32::from(pixel[lane]) * i32::from(weight[lane]));
                }
            }
            let at = (oy * output_w + ox) * channels + block * LANES;
            // Profiling on Zen 5: LLVM turns this into a truncating store (vpmovdb to memory), which costs most of
            // the interior time; the loop without the store ran about ten times faster.
            let out: &mut [u8; LANES] = (&mut output[at..at + LANES]).try_into().unwrap();
            for lane in 0..LANES {
                out[lane] = requantize(sums[lane], scale[lane], self.clamp);
            }
        }
    }

    /// Index of the first input byte of output pixel (oy, ox)'s window, which must lie wholly inside the input.
    fn interior_window_start(&self, oy: usize, ox: usize) -> usize {
        let g = &self.geometry;
        ((oy * g.stride.0 - g.pad.0) * g.input.1 + ox * g.stride.1 - g.pad.1) * g.channels
    }

    /// One past the last input byte that the whole blocks of interior row `oy` read: reads grow with the column, the
    /// tap offset and the block, so the last column's furthest tap in the last block bounds them all. Needs `oy` in
    /// `rows` and `columns` not empty.
    fn interior_reach(&self, oy: usize) -> usize {
        let furthest_offset = self.tap_offsets.iter().max().copied().unwrap_or(0);
        self.interior_window_start(oy, self.columns.end - 1) + furthest_offset + self.blocks * LANES
    }

    /// Exact for any pixel: visits only the taps inside the input and subtracts the input zero point per tap.
    #[inline(always)]
    fn general_pixel(
        &self,
        input: &[u8],
        output: &mut [u8],
        (oy, ox): (usize, usize),
        channels: Range<usize>,
        sums: &mut [i32],
    ) {
        let g = &self.geometry;
        let count = g.channels;
        let sums = &mut sums[channels.clone()];
        sums.copy_from_slice(&self.bias[channels.clone()]);
        let rows = tap_range(oy, g.input.0, g.kernel.0, g.stride.0, g.pad.0);
        let columns = tap_range(ox, g.input.1, g.kernel.1, g.stride.1, g.pad.1);
        for ky in rows {
            let iy = oy * g.stride.0 + ky - g.pad.0;
            for kx in columns.clone() {
                let ix = ox * g.stride.1 + kx - g.pad.1;
                let pixel = &input[(iy * g.input.1 + ix) * count..][channels.clone()];
                let weights = &self.weights[(ky * g.kernel.1 + kx) * count..][channels.clone()];
                for ((sum, &x), &weight) in sums.iter_mut().zip(pixel).zip(weights) {
                    *sum = sum.wrapping_add((i32::from(x) - self.input_zero) * i32::from(weight));
                }
            }
        }
        let out = &mut output[(oy * g.output.1 + ox) * count..][channels.clone()];
        for ((out, &sum), &scale) in out.iter_mut().zip(sums.iter()).zip(&self.scale[channels]) {
            *out = requantize(sum, scale, self.clamp);
        }
    }
}

/// The interior with explicit AVX-512. Left to itself, LLVM narrows each vector of results with a truncating store
/// (vpmovdb to memory), which is slow on AMD Zen 4 and 5 and took most of the interior time; here the narrowing stays
/// in registers and a plain store writes the bytes.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    impl Depthwise {
        #[target_feature(enable = "avx512f,avx512bw")]
        pub(super) fn interior_row_avx512(&self, input: &[u8], output: &mut [u8], oy: usize, blocks: Range<usize>) {
            let taps = self.tap_offsets.len();
            for block in blocks {
                let weights = &self.block_weights[block * taps..][..taps];
                // A fixed tap count lets LLVM unroll the taps and keep the weights in registers.
                if let (Ok(weights), Ok(offsets)) =
                    (<&[_; 9]>::try_from(weights), <&[usize; 9]>::try_from(&self.tap_offsets[..]))
                {
                    self.interior_span_avx512(input, output, oy, block, weights, offsets);
                } else {
                    self.interior_span_avx512(input, output, oy, block, weights, &self.tap_offsets);
                }
            }
        }

        /// One block of channels over the interior columns of output row `oy`, which must be an interior row.
        /// Generic rather than taking slices, as it cannot be inlined into a caller and would lose a fixed tap count.
        #[target_feature(enable = "avx512f,avx512bw")]
        fn interior_span_avx512<W: AsRef<[[i16; LANES]]>, O: AsRef<[usize]>>(
            &self,
            input: &[u8],
            output: &mut [u8],
            oy: usize,
            block: usize,
            weights: W,
            offsets: O,
        ) {
            let (weights, offsets) = (weights.as_ref(), offsets.as_ref());
            let g = &self.geometry;
            let channels = g.channels;
            let reach = self.interior_reach(oy);
            assert!(reach <= input.len(), "interior span reads past the input");
            assert_eq!(weights.len(), offsets.len());
            let furthest_offset = self.tap_offsets.iter().max().copied().unwrap_or(0);
            let weights = weights.iter().map(|weight| _mm512_cvtepi16_epi32(load_i16(weight)));
            let bias = load_i32(&self.block_bias[block]);
            let scale = load_f32(&self.block_scale[block]);
            let low = _mm512_set1_ps(self.clamp.low);
            let high = _mm512_set1_ps(self.clamp.high);
            let magic = _mm512_set1_ps(MAGIC);
            let magic_minus_zero = _mm512_set1_epi32(self.clamp.magic_minus_zero);
            for ox in self.columns.clone() {
                let start = self.interior_window_start(oy, ox) + block * LANES;
                debug_assert!(start + furthest_offset + LANES <= reach);
                let mut sums = bias;
                for (weight, &offset) in weights.clone().zip(offsets) {
                    // SAFETY: `start + offset + LANES <= reach <= input.len()`: `interior_reach` bounds every read of
                    // the row's whole blocks, as ox < columns.end, block < blocks and offset <= the largest offset,
                    // and `reach` was asserted against the input length above.
                    let pixel = unsafe { _mm_loadu_si128(input.as_ptr().add(start + offset).cast()) };
                    // The pixel's zero-extended high halves make vpmaddwd a 16x16 -> 32 bit multiply, cheaper than
                    // vpmulld.
                    sums = _mm512_add_epi32(sums, _mm512_madd_epi16(_mm512_cvtepu8_epi32(pixel), weight));
                }
                // As `requantize`, lane by lane.
                let value = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), scale);
                let value = _mm512_min_ps(_mm512_max_ps(value, low), high);
                let value = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(value, magic)), magic_minus_zero);
                let at = (oy * g.output.1 + ox) * channels + block * LANES;
                store_u8(<&mut [u8; LANES]>::try_from(&mut output[at..at + LANES]).unwrap(), narrow(value));
            }
        }
    }

    /// The low byte of each lane, for lanes that all lie in 0..=255.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn narrow(values: __m512i) -> __m128i {
        // Not vpmovdb into a register: LLVM folds it and the store that follows back into the slow vpmovdb to memory.
        // The packs saturate, which changes nothing here, and work within 128-bit lanes, leaving each lane's four
        // bytes in its first dword.
        let words = _mm512_packs_epi32(values, values);
        let bytes = _mm512_packus_epi16(words, words);
        let first_dwords = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_castsi512_si128(_mm512_permutexvar_epi32(first_dwords, bytes))
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load_i16(values: &[i16; LANES]) -> __m256i {
        // SAFETY: reads exactly the 32 bytes of `values`.
        unsafe { _mm256_loadu_si256(values.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn load_i32(values: &[i32; LANES]) -> __m512i {
        // SAFETY: reads exactly the 64 bytes of `values`.
        unsafe { _mm512_loadu_si512(values.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn load_f32(values: &[f32; LANES]) -> __m512 {
        // SAFETY: reads exactly the 64 bytes of `values`.
        unsafe { _mm512_loadu_ps(values.as_ptr()) }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn store_u8(out: &mut [u8; LANES], bytes: __m128i) {
        // SAFETY: writes exactly the 16 bytes of `out`.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), bytes) }
    }
}

/// [`Wide`]'s kernel.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::avx512::{load_f32, load_i32};
    use super::*;
    use std::arch::x86_64::*;

    /// One input column of a group, arranged: the rows' bytes (less 128) four to a lane, and their sum times `c`.
    #[derive(Clone, Copy)]
    struct Column {
        bytes: [__m512i; GROUP_BLOCKS],
        shifted_sums: [__m512i; GROUP_BLOCKS],
    }

    impl Depthwise {
        /// Group `group` of 64 channels over the interior columns of interior output row `oy`.
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        pub(super) fn interior_group_vnni(&self, input: &[u8], output: &mut [u8], oy: usize, group: usize) {
            let g = &self.geometry;
            let (input_w, channels) = (g.input.1, g.channels);
            let wide = &self.wide;
            let first = group * GROUP_BLOCKS;
            let weights: [[__m512i; 3]; GROUP_BLOCKS] =
                std::array::from_fn(|j| wide.weights[first + j].each_ref().map(|bytes| load_bytes(bytes)));
            let shift: [__m512i; GROUP_BLOCKS] = std::array::from_fn(|j| load_bytes(&wide.shift[first + j]));
            let bias: [__m512i; GROUP_BLOCKS] = std::array::from_fn(|j| load_i32(&wide.bias[first + j]));
            let scale: [__m512; GROUP_BLOCKS] = std::array::from_fn(|j| load_f32(&wide.scale[first + j]));
            let low = _mm512_set1_ps(self.clamp.low);
            let high = _mm512_set1_ps(self.clamp.high);
            let magic = _mm512_set1_ps(MAGIC);
            let magic_minus_zero = _mm512_set1_epi32(self.clamp.magic_minus_zero);
            let flip = _mm512_set1_epi8(-128);
            let top = oy * g.stride.0 - g.pad.0;
            let column = |ix: usize| -> Column {
                let row = |ky: usize| {
                    let at = ((top + ky) * input_w + ix) * channels + group * GROUP;
                    _mm512_xor_si512(load_bytes(input[at..at + GROUP].try_into().unwrap()), flip)
                };
                let (r0, r1, r2, zero) = (row(0), row(1), row(2), _mm512_setzero_si512());
                let (low01, high01) = (_mm512_unpacklo_epi8(r0, r1), _mm512_unpackhi_epi8(r0, r1));
                let (low2, high2) = (_mm512_unpacklo_epi8(r2, zero), _mm512_unpackhi_epi8(r2, zero));
                let bytes = [
                    _mm512_unpacklo_epi16(low01, low2),
                    _mm512_unpackhi_epi16(low01, low2),
                    _mm512_unpacklo_epi16(high01, high2),
                    _mm512_unpackhi_epi16(high01, high2),
                ];
                let shifted_sums = std::array::from_fn(|j| _mm512_dpbusd_epi32(zero, shift[j], bytes[j]));
                Column { bytes, shifted_sums }
            };
            // The last four columns arranged, by column modulo 4: enough for a window's three at strides 1 and 2.
            let mut ring =
                [Column { bytes: [_mm512_setzero_si512(); 4], shifted_sums: [_mm512_setzero_si512(); 4] }; 4];
            let mut next = self.columns.start * g.stride.1 - g.pad.1;
            for ox in self.columns.clone() {
                let left = ox * g.stride.1 - g.pad.1;
                while next < left + 3 {
                    ring[next % 4] = column(next);
                    next += 1;
                }
                let window = [&ring[left % 4], &ring[(left + 1) % 4], &ring[(left + 2) % 4]];
                let values: [__m512i; GROUP_BLOCKS] = std::array::from_fn(|j| {
                    // Two short chains rather than one long one.
                    let mut sum = bias[j];
                    for (kx, column) in window.iter().enumerate() {
                        sum = _mm512_dpbusd_epi32(sum, weights[j][kx], column.bytes[j]);
                    }
                    let [a, b, c] = window.map(|column| column.shifted_sums[j]);
                    let sum = _mm512_sub_epi32(sum, _mm512_add_epi32(_mm512_add_epi32(a, b), c));
                    // As `requantize`, lane by lane.
                    let value = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), scale[j]);
                    let value = _mm512_min_ps(_mm512_max_ps(value, low), high);
                    _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(value, magic)), magic_minus_zero)
                });
                // Within each 128-bit lane: channels 16k..16k+7, then 16k+8..16k+15, in order.
                let words = [_mm512_packs_epi32(values[0], values[1]), _mm512_packs_epi32(values[2], values[3])];
                let bytes = _mm512_packus_epi16(words[0], words[1]);
                let at = (oy * g.output.1 + ox) * channels + group * GROUP;
                store_bytes((&mut output[at..at + GROUP]).try_into().unwrap(), bytes);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load_bytes(values: &[u8; GROUP]) -> __m512i {
        // SAFETY: reads exactly the 64 bytes of `values`.
        unsafe { _mm512_loadu_si512(values.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn store_bytes(out: &mut [u8; GROUP], bytes: __m512i) {
        // SAFETY: writes exactly the 64 bytes of `out`.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), bytes) }
    }
}

#[inline(always)]
fn requantize(sum: i32, scale: f32, clamp: Clamp) -> u8 {
    let value = sum as f32 * scale;
    // Clamping before rounding equals clamping after, as the bounds are integers. Comparisons rather than
    // f32::max/min: scale is finite so no NaN arises, and these compile to single instructions.
    let value = if value < clamp.low { clamp.low } else { value };
    let value = if value > clamp.high { clamp.high } else { value };
    // The result lies in low..=high, so the narrowing is exact.
    ((value + MAGIC).to_bits() as i32).wrapping_sub(clamp.magic_minus_zero) as u8
}

fn check_geometry(g: &Geometry) -> Result<(), String> {
    let sizes = [
        ("channels", g.channels),
        ("input height", g.input.0),
        ("input width", g.input.1),
        ("output height", g.output.0),
        ("output width", g.output.1),
        ("kernel height", g.kernel.0),
        ("kernel width", g.kernel.1),
        ("vertical stride", g.stride.0),
        ("horizontal stride", g.stride.1),
    ];
    if let Some((name, _)) = sizes.iter().find(|(_, size)| *size == 0) {
        return Err(format!("{name} is zero"));
    }
    check_axis("rows", g.input.0, g.output.0, g.kernel.0, g.stride.0, g.pad.0)?;
    check_axis("columns", g.input.1, g.output.1, g.kernel.1, g.stride.1, g.pad.1)?;
    // Every index later computed stays below one of these products.
    let products = [
        [g.input.0, g.input.1, g.channels],
        [g.output.0, g.output.1, g.channels],
        [g.kernel.0, g.kernel.1, g.channels],
        // Tap offsets: the kernel may be taller and wider than the input.
        [g.kernel.0, g.input.1.checked_add(g.kernel.1).ok_or("sizes overflow")?, g.channels],
    ];
    for product in products {
        product.iter().try_fold(1usize, |total, &size| total.checked_mul(size)).ok_or("sizes overflow")?;
    }
    Ok(())
}

/// Requires every window to overlap the input, which bounds both the leading padding and the trailing
/// padding the output size implies by `kernel - 1`.
fn check_axis(name: &str, input: usize, output: usize, kernel: usize, stride: usize, pad: usize) -> Result<(), String> {
    if pad >= kernel {
        return Err(format!("{name}: padding {pad} puts the first window wholly outside the input (kernel {kernel})"));
    }
    let last_start = (output - 1).checked_mul(stride).ok_or_else(|| format!("{name}: output size overflows"))?;
    if last_start >= input.checked_add(pad).ok_or_else(|| format!("{name}: input size overflows"))? {
        return Err(format!(
            "{name}: {output} outputs with stride {stride} run past the input ({input} plus padding {pad})"
        ));
    }
    Ok(())
}

/// Taps along one axis that land inside the input for output position `output`.
fn tap_range(output: usize, input: usize, kernel: usize, stride: usize, pad: usize) -> Range<usize> {
    let start = output * stride;
    let first = pad.saturating_sub(start);
    let end = (input + pad).saturating_sub(start).min(kernel);
    first..end.max(first)
}

/// Output positions along one axis whose whole window lies inside the input.
fn interior_range(outputs: usize, input: usize, kernel: usize, stride: usize, pad: usize) -> Range<usize> {
    let first = pad.div_ceil(stride);
    let end = match (input + pad).checked_sub(kernel) {
        Some(room) => (room / stride + 1).min(outputs),
        None => 0,
    };
    first.min(end)..end
}

#[cfg(test)]
mod tests {
    use super::super::testing::Rng;
    use super::*;

    const VARIANTS: [Variant; 4] = [Variant::Portable, Variant::Avx2, Variant::Avx512, Variant::Vnni];

    /// The variants this CPU runs: every one on the machines the tests are
    /// meant for (`every_variant_runs_here`), which have AVX-512 VNNI.
    fn variants() -> impl Iterator<Item = Variant> {
        VARIANTS.into_iter().filter(|variant| variant.available())
    }

    #[derive(Clone)]
    struct Case {
        geometry: Geometry,
        weights: Vec<u8>,
        signed: bool,
        weight_zero: Vec<i32>,
        input_zero: i32,
        bias: Vec<i32>,
        requantize: Requantize,
        input: Vec<u8>,
    }

    impl Case {
        fn build(&self) -> Depthwise {
            Depthwise::new(
                self.geometry,
                &self.weights,
                self.signed,
                &self.weight_zero,
                self.input_zero,
                &self.bias,
                self.requantize.clone(),
            )
            .unwrap_or_else(|error| panic!("{:?}: {error}", self.geometry))
        }

        fn run(&self, variant: Variant) -> Vec<u8> {
            let g = self.geometry;
            let mut output = vec![0xA5; g.output.0 * g.output.1 * g.channels];
            self.build().with_variant(variant).run(&self.input, &mut output);
            output
        }

        /// The definition, written as plainly as possible.
        fn oracle(&self) -> Vec<u8> {
            let g = self.geometry;
            let c = g.channels;
            let mut output = Vec::new();
            for oy in 0..g.output.0 {
                for ox in 0..g.output.1 {
                    for channel in 0..c {
                        let mut sum = self.bias[channel];
                        for ky in 0..g.kernel.0 {
                            for kx in 0..g.kernel.1 {
                                let iy = (oy * g.stride.0 + ky) as isize - g.pad.0 as isize;
                                let ix = (ox * g.stride.1 + kx) as isize - g.pad.1 as isize;
                                if iy < 0 || ix < 0 || iy >= g.input.0 as isize || ix >= g.input.1 as isize {
                                    continue;
                                }
                                let x = i32::from(self.input[(iy as usize * g.input.1 + ix as usize) * c + channel]);
                                let byte = self.weights[(ky * g.kernel.1 + kx) * c + channel];
                                let w = if self.signed { i32::from(byte as i8) } else { i32::from(byte) };
                                sum = sum.wrapping_add((x - self.input_zero) * (w - self.weight_zero[channel]));
                            }
                        }
                        let rounded = (sum as f32 * self.requantize.scale[channel]).round_ties_even();
                        let shifted = (rounded as i64).saturating_add(i64::from(self.requantize.output_zero));
                        let clamped = shifted.clamp(i64::from(self.requantize.low), i64::from(self.requantize.high));
                        output.push(clamped as u8);
                    }
                }
            }
            output
        }

        fn check(&self) {
            let expected = self.oracle();
            for variant in variants() {
                let got = self.run(variant);
                if let Some(at) = (0..expected.len()).find(|&at| got[at] != expected[at]) {
                    let c = self.geometry.channels;
                    panic!(
                        "{variant:?} {:?}: pixel {} channel {} gave {} instead of {}",
                        self.geometry,
                        at / c,
                        at % c,
                        got[at],
                        expected[at]
                    );
                }
            }
        }
    }

    /// Largest output size along an axis where every window still overlaps the input.
    fn largest_output(input: usize, stride: usize, pad: usize) -> usize {
        (input - 1 + pad) / stride + 1
    }

    fn random_case(rng: &mut Rng, geometry: Geometry, extreme: bool) -> Case {
        let g = geometry;
        let c = g.channels;
        let signed = rng.below(2) == 0;
        let taps = g.kernel.0 * g.kernel.1;
        let edge = |rng: &mut Rng, values: &[i64], low: i64, high: i64| {
            if extreme { rng.pick(values) } else { rng.range(low, high) }
        };
        let weights = (0..taps * c).map(|_| if extreme { rng.pick(&[0, 127, 128, 255]) } else { rng.byte() }).collect();
        let weight_zero = (0..c)
            .map(|_| match rng.below(3) {
                0 => 0,
                _ if signed => edge(rng, &[-128, 127, -255, 255], -128, 127) as i32,
                _ => edge(rng, &[0, 255, -255], 0, 255) as i32,
            })
            .collect();
        let any = i32::from(rng.byte());
        let input_zero = rng.pick(&[0, 128, 255, any]);
        let bias_range = if extreme { i64::from(i32::MAX) } else { 1 << 15 };
        let bias = (0..c)
            .map(|_| {
                if extreme && rng.below(2) == 0 {
                    rng.pick(&[i32::MIN, i32::MAX, i32::MIN + 1000, i32::MAX - 1000])
                } else {
                    rng.range(-bias_range, bias_range) as i32
                }
            })
            .collect();
        // Mostly scales that land in range, some that clamp, some that tie, some negative.
        let typical = 1.0 / (128.0 * (taps as f32).sqrt() * 64.0);
        let scale = (0..c)
            .map(|_| match rng.below(6) {
                0 => 0.5,
                1 => rng.pick(&[1.0, 3.0e5, 1.0e30, f32::MAX, f32::MIN_POSITIVE, 0.0]),
                2 => -typical * (1 + rng.below(8)) as f32,
                _ => typical * (1 + rng.below(64)) as f32 / 8.0,
            })
            .collect();
        let low = if rng.below(3) == 0 { rng.byte() } else { 0 };
        let high = if rng.below(3) == 0 { low.max(rng.byte()) } else { 255 };
        let output_zero = match rng.below(4) {
            0 => rng.pick(&[0, 255, -(MAX_OUTPUT_ZERO as i32), MAX_OUTPUT_ZERO as i32]),
            _ => rng.range(0, 255) as i32,
        };
        let input =
            (0..g.input.0 * g.input.1 * c).map(|_| if extreme { rng.pick(&[0, 255]) } else { rng.byte() }).collect();
        Case {
            geometry,
            weights,
            signed,
            weight_zero,
            input_zero,
            bias,
            requantize: Requantize { scale, output_zero, low, high },
            input,
        }
    }

    #[test]
    fn every_variant_runs_here() {
        for variant in [Variant::Portable, Variant::Avx2, Variant::Avx512] {
            assert!(variant.available(), "{variant:?} missing: this test machine should exercise every path");
        }
        // AVX-512 without VNNI (Skylake-SP) still tests the others.
        if Variant::Vnni.available() {
            assert_eq!(Variant::best(), Variant::Vnni);
        } else {
            eprintln!("skipped: this CPU has AVX-512 but not VNNI, so the Vnni variant goes untested");
            assert_eq!(Variant::best(), Variant::Avx512);
        }
    }

    #[test]
    fn tap_and_interior_ranges_are_exact() {
        for input in 1..=9 {
            for kernel in 1..=5 {
                for stride in 1..=3 {
                    for pad in 0..kernel {
                        let outputs = largest_output(input, stride, pad);
                        assert!(check_axis("", input, outputs, kernel, stride, pad).is_ok());
                        assert!(check_axis("", input, outputs + 1, kernel, stride, pad).is_err());
                        let interior = interior_range(outputs, input, kernel, stride, pad);
                        assert!(interior.start <= interior.end && interior.end <= outputs);
                        for output in 0..outputs {
                            let inside = |k: usize| {
                                (0..input as isize).contains(&((output * stride + k) as isize - pad as isize))
                            };
                            let expected: Vec<usize> = (0..kernel).filter(|&k| inside(k)).collect();
                            let got: Vec<usize> = tap_range(output, input, kernel, stride, pad).collect();
                            assert_eq!(got, expected, "taps: input {input} kernel {kernel} stride {stride} pad {pad}");
                            assert!(!got.is_empty(), "a window misses the input");
                            assert_eq!(
                                interior.contains(&output),
                                expected.len() == kernel,
                                "interior: input {input} kernel {kernel} stride {stride} pad {pad} output {output}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn interior_reads_stay_inside_the_input() {
        // The bound `interior_span` asserts, checked independently over small geometries.
        for (input, kernel, stride, pad) in small_axes() {
            for channels in [16, 17, 32] {
                let outputs = largest_output(input, stride, pad);
                let geometry = Geometry {
                    channels,
                    input: (input, input + 1),
                    output: (outputs, largest_output(input + 1, stride, pad)),
                    kernel: (kernel, kernel),
                    stride: (stride, stride),
                    pad: (pad, pad),
                };
                let case = random_case(&mut Rng(7), geometry, false);
                let depthwise = case.build();
                let g = geometry;
                for oy in depthwise.rows.clone() {
                    let mut reach = 0;
                    for ox in depthwise.columns.clone() {
                        let first = ((oy * stride - pad) * g.input.1 + ox * stride - pad) * channels;
                        assert_eq!(depthwise.interior_window_start(oy, ox), first);
                        let last = first + depthwise.tap_offsets.iter().max().unwrap() + depthwise.blocks * LANES;
                        assert!(last <= case.input.len());
                        // Every byte each whole block reads, tap by tap, from the geometry alone.
                        for (ky, kx, block) in (0..kernel).flat_map(|ky| {
                            (0..kernel).flat_map(move |kx| (0..channels / LANES).map(move |b| (ky, kx, b)))
                        }) {
                            let (iy, ix) = (oy * stride + ky - pad, ox * stride + kx - pad);
                            reach = reach.max((iy * g.input.1 + ix) * channels + (block + 1) * LANES);
                        }
                    }
                    if !depthwise.columns.is_empty() && depthwise.blocks > 0 {
                        assert_eq!(depthwise.interior_reach(oy), reach, "{geometry:?} row {oy}");
                        assert!(reach <= case.input.len());
                    }
                }
            }
        }
    }

    fn small_axes() -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (1..=9).flat_map(|input| {
            (1..=3).flat_map(move |kernel| {
                (1..=2).flat_map(move |stride| (0..kernel).map(move |pad| (input, kernel, stride, pad)))
            })
        })
    }

    #[test]
    fn rejects_inconsistent_geometry() {
        let good = Geometry { channels: 3, input: (5, 5), output: (5, 5), kernel: (3, 3), stride: (1, 1), pad: (1, 1) };
        let case = random_case(&mut Rng(1), good, false);
        let build = |geometry: Geometry| {
            Depthwise::new(
                geometry,
                &case.weights,
                case.signed,
                &case.weight_zero,
                case.input_zero,
                &case.bias,
                case.requantize.clone(),
            )
            .map(|_| ())
        };
        assert!(build(good).is_ok());
        // Two rows of trailing padding still let the last window overlap the input; three would not.
        assert!(build(Geometry { output: (6, 5), ..good }).is_ok());
        let bad = [
            Geometry { input: (0, 5), ..good },
            Geometry { output: (5, 0), ..good },
            Geometry { stride: (0, 1), ..good },
            Geometry { output: (7, 5), ..good },
            Geometry { output: (5, 7), ..good },
            Geometry { pad: (3, 1), ..good },
            Geometry { output: (3, 5), stride: (2, 1), pad: (0, 1), input: (4, 5), ..good },
            Geometry { output: (usize::MAX, 5), ..good },
            Geometry { input: (usize::MAX / 2, usize::MAX / 2), ..good },
        ];
        for geometry in bad {
            assert!(build(geometry).is_err(), "{geometry:?} accepted");
        }
        // Kernel and channel changes make the weight length wrong.
        assert!(build(Geometry { kernel: (0, 3), ..good }).is_err());
        assert!(build(Geometry { channels: 4, ..good }).is_err());

        let with = |change: &dyn Fn(&mut Case)| {
            let mut case = case.clone();
            change(&mut case);
            Depthwise::new(
                case.geometry,
                &case.weights,
                case.signed,
                &case.weight_zero,
                case.input_zero,
                &case.bias,
                case.requantize,
            )
            .map(|_| ())
        };
        assert!(with(&|_| {}).is_ok());
        assert!(with(&|case| case.weights.pop().map(drop).unwrap()).is_err());
        assert!(with(&|case| case.bias.push(0)).is_err());
        assert!(with(&|case| case.weight_zero.truncate(1)).is_err());
        assert!(with(&|case| case.requantize.scale.push(1.0)).is_err());
        assert!(with(&|case| case.requantize.scale[1] = f32::NAN).is_err());
        assert!(with(&|case| case.requantize.scale[1] = f32::INFINITY).is_err());
        assert!(with(&|case| case.input_zero = 256).is_err());
        assert!(with(&|case| case.input_zero = -1).is_err());
        assert!(with(&|case| case.weight_zero[0] = 256).is_err());
        assert!(with(&|case| case.requantize.output_zero = i32::MIN).is_err());
        assert!(with(&|case| (case.requantize.low, case.requantize.high) = (10, 9)).is_err());
    }

    #[test]
    #[should_panic(expected = "input length")]
    fn run_checks_input_length() {
        let g = Geometry { channels: 3, input: (5, 5), output: (5, 5), kernel: (3, 3), stride: (1, 1), pad: (1, 1) };
        let case = random_case(&mut Rng(1), g, false);
        case.build().run(&case.input[1..], &mut [0; 75]);
    }

    #[test]
    #[should_panic(expected = "output length")]
    fn run_checks_output_length() {
        let g = Geometry { channels: 3, input: (5, 5), output: (5, 5), kernel: (3, 3), stride: (1, 1), pad: (1, 1) };
        let case = random_case(&mut Rng(1), g, false);
        case.build().run(&case.input, &mut [0; 76]);
    }

    /// Every small size, kernel, stride and (asymmetric) padding, with channels that fill a block and spill over.
    #[test]
    fn matches_oracle_on_small_geometries() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for input in 1..=9 {
            for kernel in [1, 3, 5] {
                for (stride_y, stride_x) in [(1, 1), (2, 2), (1, 2), (2, 1)] {
                    for pad_y in 0..kernel {
                        for pad_x in 0..kernel {
                            let input_size = (input, (input + pad_x) % 9 + 1);
                            let geometry = Geometry {
                                channels: rng.pick(&[1, 3, 16, 17, 33, 64, 96]),
                                input: input_size,
                                output: (
                                    largest_output(input_size.0, stride_y, pad_y),
                                    largest_output(input_size.1, stride_x, pad_x),
                                ),
                                kernel: (kernel, kernel),
                                stride: (stride_y, stride_x),
                                pad: (pad_y, pad_x),
                            };
                            let extreme = rng.below(4) == 0;
                            random_case(&mut rng, geometry, extreme).check();
                        }
                    }
                }
            }
        }
    }

    /// Random draws over the whole space the brief names, including smaller (VALID-like) outputs.
    #[test]
    fn matches_oracle_on_random_geometries() {
        let mut rng = Rng(12345);
        for _ in 0..400 {
            let sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 28];
            let kernel = rng.pick(&[(1, 1), (3, 3), (5, 5), (3, 1), (1, 5)]);
            let stride = (rng.pick(&[1, 2]), rng.pick(&[1, 2]));
            let pad = (rng.below(kernel.0), rng.below(kernel.1));
            let input = (rng.pick(&sizes), rng.pick(&sizes));
            let largest = (largest_output(input.0, stride.0, pad.0), largest_output(input.1, stride.1, pad.1));
            let output =
                (1 + rng.below(largest.0), if rng.below(2) == 0 { largest.1 } else { 1 + rng.below(largest.1) });
            let channels = rng.pick(&[1, 3, 16, 17, 32, 33, 64, 144]);
            let geometry = Geometry { channels, input, output, kernel, stride, pad };
            let extreme = rng.below(4) == 0;
            random_case(&mut rng, geometry, extreme).check();
        }
    }

    /// A 3x3 kernel over a square input with TFLite's SAME padding: one
    /// before at stride 1, none at stride 2 on an even side.
    fn same_3x3(size: usize, channels: usize, stride: usize) -> Geometry {
        let pad = if stride == 1 { 1 } else { 0 };
        let output = size.div_ceil(stride);
        Geometry {
            channels,
            input: (size, size),
            output: (output, output),
            kernel: (3, 3),
            stride: (stride, stride),
            pad: (pad, pad),
        }
    }

    /// The MobileNet V2 shapes at reduced size, with both TFLite SAME paddings.
    #[test]
    fn matches_oracle_on_mobilenet_like_shapes() {
        let mut rng = Rng(99);
        for (size, channels) in [(14usize, 144), (28, 32), (7, 960), (8, 48)] {
            for stride in [1, 2] {
                let geometry = same_3x3(size, channels, stride);
                for extreme in [false, true] {
                    random_case(&mut rng, geometry, extreme).check();
                }
            }
        }
    }

    /// Halves of odd sums round to the even neighbour, checked against hand-derived values rather than the oracle.
    #[test]
    fn ties_round_to_even() {
        let channels = 256;
        for variant in variants() {
            for (bias, output_zero) in [(0, 0), (-256, 128)] {
                let geometry =
                    Geometry { channels, input: (3, 3), output: (3, 3), kernel: (1, 1), stride: (1, 1), pad: (0, 0) };
                let depthwise = Depthwise::new(
                    geometry,
                    &vec![1; channels],
                    false,
                    &vec![0; channels],
                    0,
                    &vec![bias; channels],
                    Requantize { scale: vec![0.5; channels], output_zero, low: 0, high: 255 },
                )
                .unwrap()
                .with_variant(variant);
                let input: Vec<u8> = (0..9).flat_map(|_| 0..=255).collect();
                let mut output = vec![0; input.len()];
                depthwise.run(&input, &mut output);
                for (&x, &got) in input.iter().zip(&output) {
                    let sum = i32::from(x) + bias;
                    let half = sum.div_euclid(2);
                    // An odd sum is a tie between half and half + 1; the even one wins.
                    let rounded = if sum % 2 != 0 && half % 2 != 0 { half + 1 } else { half };
                    assert_eq!(i32::from(got), rounded + output_zero, "{variant:?}: sum {sum}");
                }
            }
        }
    }

    #[test]
    fn clamps_to_low_and_high() {
        let geometry =
            Geometry { channels: 32, input: (4, 4), output: (4, 4), kernel: (3, 3), stride: (1, 1), pad: (1, 1) };
        let mut rng = Rng(5);
        let mut case = random_case(&mut rng, geometry, false);
        case.requantize = Requantize { scale: vec![1.0; 32], output_zero: 100, low: 20, high: 200 };
        let output = case.oracle();
        assert!(output.contains(&20) && output.contains(&200));
        case.check();
    }

    /// Microseconds per call for the MobileNet V2 depthwise layers:
    /// `cargo test --release -- --ignored --nocapture benchmark`
    #[test]
    #[ignore]
    fn benchmark() {
        let mut rng = Rng(2024);
        let shapes = [
            (112usize, 32, 1),
            (112, 96, 2),
            (56, 144, 1),
            (56, 144, 2),
            (28, 192, 1),
            (28, 192, 2),
            (14, 384, 1),
            (14, 576, 1),
            (14, 576, 2),
            (7, 960, 1),
        ];
        println!("{:>22} {:>10} {:>10} {:>10} {:>10}", "input, channels, stride", "portable", "avx2", "avx512", "vnni");
        let mut totals = [0.0; VARIANTS.len()];
        for (size, channels, stride) in shapes {
            let output = size.div_ceil(stride);
            let geometry = same_3x3(size, channels, stride);
            let case = random_case(&mut rng, geometry, false);
            let mut out = vec![0; output * output * channels];
            let mut line = format!("{:>22}", format!("{size}x{size}x{channels} s{stride}"));
            // BENCH_ONLY=avx512 (say) times one variant alone, for profiling.
            let only = std::env::var("BENCH_ONLY").unwrap_or_default().to_lowercase();
            for (index, variant) in VARIANTS.into_iter().enumerate() {
                if !variant.available() || (!only.is_empty() && format!("{variant:?}").to_lowercase() != only) {
                    line += &format!(" {:>10}", "-");
                    continue;
                }
                let depthwise = case.build().with_variant(variant);
                depthwise.run(&case.input, &mut out);
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let iterations = 50;
                    let started = std::time::Instant::now();
                    for _ in 0..iterations {
                        depthwise.run(std::hint::black_box(&case.input), &mut out);
                    }
                    best = best.min(started.elapsed().as_secs_f64() * 1e6 / iterations as f64);
                }
                totals[index] += best;
                line += &format!(" {best:>10.1}");
            }
            println!("{line}");
        }
        println!("{:>22} {:>10.1} {:>10.1} {:>10.1} {:>10.1}", "total", totals[0], totals[1], totals[2], totals[3]);
    }
}
