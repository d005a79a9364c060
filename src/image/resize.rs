//! Any decoded image to 8-bit RGB at the model's size.
//!
//! 16-bit, grayscale, alpha and CMYK-decoded images are converted to 8-bit
//! RGB. The image is squashed to the model's size with a bilinear (triangle)
//! filter that widens with the reduction, as Pillow's `resize(BILINEAR)` does,
//! which is what the reference outputs were computed with: a filter that only
//! samples four pixels, as most "bilinear" resizers do, would alias on large
//! photos and move the scores.

use image::DynamicImage;

use super::DecodeError;

/// Converts `image` to 8-bit RGB and resizes it to `width` x `height`.
pub fn resize(image: DynamicImage, width: u32, height: u32) -> Result<Vec<u8>, DecodeError> {
    let rgb = match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    };
    if width == 0 || height == 0 {
        return Err(DecodeError::Resize(format!("a size of {width}x{height}")));
    }
    if rgb.dimensions() == (width, height) {
        return Ok(rgb.into_raw());
    }
    let (src_width, src_height) = rgb.dimensions();
    let source = Plane { pixels: rgb.as_raw(), width: src_width as usize, height: src_height as usize };
    Ok(bilinear(source, width as usize, height as usize))
}

/// Pillow's fixed point: 32 bits less 8 for the pixel and 2 for the sign
/// and the sum's overshoot (Resample.c, `PRECISION_BITS` for 8-bit images).
const PRECISION_BITS: u32 = 22;

/// RGB pixels, row by row.
#[derive(Clone, Copy)]
struct Plane<'a> {
    pixels: &'a [u8],
    width: usize,
    height: usize,
}

/// For each output position along one axis, the first input position it
/// reads, and the fixed-point weight of each input position from there.
struct Taps {
    first: Vec<usize>,
    /// `size` weights an output, zero past the last it reads.
    weights: Vec<i32>,
    /// The weights an output reads, from its first: the window less the
    /// weights that are 0 at either end (the triangle's tips, and weights
    /// that round to 0), which add nothing to the sum: a reduction by 7
    /// reads about 15 of the 17 it leaves room for.
    counts: Vec<usize>,
    size: usize,
}

impl Taps {
    /// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for the
    /// bilinear (triangle) filter, whose support widens with the reduction
    /// so that every input pixel counts: the same weights to the bit, so the
    /// same pixels as the reference outputs were computed from.
    fn bilinear(input: usize, output: usize) -> Taps {
        let scale = input as f64 / output as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale;
        let size = support.ceil() as usize * 2 + 1;
        let mut first = Vec::with_capacity(output);
        let mut counts = Vec::with_capacity(output);
        let mut weights = vec![0i32; output * size];
        let mut real = vec![0f64; size];
        for (out, weights) in weights.chunks_exact_mut(size).enumerate() {
            let center = (out as f64 + 0.5) * scale;
            // C's casts truncate toward zero; a negative start is clamped anyway.
            let start = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).clamp(0, input as i64) as usize;
            let count = end.saturating_sub(start).min(size);
            let mut total = 0.0;
            // Pillow multiplies by the inverse, which can differ from a
            // division in the last bit.
            let inverse = 1.0 / filterscale;
            for (x, w) in real[..count].iter_mut().enumerate() {
                let distance = ((x + start) as f64 - center + 0.5) * inverse;
                *w = (1.0 - distance.abs()).max(0.0);
                total += *w;
            }
            for (fixed, &w) in weights.iter_mut().zip(&real[..count]) {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                *fixed = if w < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
            }
            let lead = weights[..count].iter().take_while(|&&w| w == 0).count();
            let read = weights[..count].iter().rposition(|&w| w != 0).map_or(0, |last| last + 1 - lead);
            weights.copy_within(lead..lead + read, 0);
            weights[read..].fill(0);
            first.push(start + lead);
            counts.push(read);
        }
        Taps { first, weights, counts, size }
    }

    /// The input positions output `out` reads, and their weights.
    fn of(&self, out: usize, input: usize) -> (usize, &[i32]) {
        let first = self.first[out];
        let weights = &self.weights[out * self.size..(out + 1) * self.size];
        (first, &weights[..self.counts[out].min(input - first)])
    }
}

/// A fixed-point sum back to a byte, as Pillow's `clip8`.
#[inline(always)]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `resize(BILINEAR)` of an 8-bit RGB image, compiled for AVX2
/// where the CPU has it: both passes are vectors of 32-bit multiplies, which
/// plain x86-64 (SSE2) has none of.
fn bilinear(source: Plane, width: usize, height: usize) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the one feature `bilinear_avx2` is compiled for.
        return unsafe { bilinear_avx2(source, width, height) };
    }
    bilinear_plain(source, width, height)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn bilinear_avx2(source: Plane, width: usize, height: usize) -> Vec<u8> {
    bilinear_plain(source, width, height)
}

/// Pillow's `resize(BILINEAR)` of an 8-bit RGB image: rows first, into only
/// the rows the columns' pass reads, then columns, each pass rounding to
/// bytes, as `ImagingResampleInner` does.
#[inline(always)]
fn bilinear_plain(source: Plane, width: usize, height: usize) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let columns = Taps::bilinear(source.height, height);
    let reads = (0..height).map(|y| columns.of(y, source.height)).map(|(first, weights)| first..first + weights.len());
    let (rows_from, rows_to) =
        reads.fold((source.height, 0), |(from, to), read| (from.min(read.start), to.max(read.end)));
    let rows_from = rows_from.min(rows_to);
    // The rows' pass, over the rows the columns' pass reads.
    let rows_pass;
    let across = if width != source.width {
        let taps = Taps::bilinear(source.width, width);
        rows_pass = across_rows(source, rows_from..rows_to, &taps, width);
        Plane { pixels: &rows_pass, width, height: rows_to - rows_from }
    } else {
        let pixels = &source.pixels[rows_from * source.width * 3..rows_to * source.width * 3];
        Plane { pixels, width, height: rows_to - rows_from }
    };
    if height == source.height {
        return across.pixels.to_vec();
    }
    // The columns' pass: whole rows weighted and summed, which vectorises.
    let row = width * 3;
    let mut out = vec![0u8; height * row];
    let mut sums = vec![0i32; row];
    for (y, out_row) in out.chunks_exact_mut(row).enumerate() {
        let (first, weights) = columns.of(y, source.height);
        sums.fill(half);
        for (k, &w) in weights.iter().enumerate() {
            let at = (first - rows_from + k) * row;
            for (sum, &p) in sums.iter_mut().zip(&across.pixels[at..at + row]) {
                *sum += i32::from(p) * w;
            }
        }
        for (o, &sum) in out_row.iter_mut().zip(&sums) {
            *o = clip8(sum);
        }
    }
    out
}

/// Rows of a block of the rows' pass, which go through it side by side.
const BLOCK: usize = 8;

/// The rows' pass over `rows` of `source`, to `width` pixels a row. Eight
/// rows at a time are turned on their side, so that an output pixel's taps
/// read each input column's eight rows as one vector with one weight, which
/// vectorises as the columns' pass does: an output pixel's own taps, along
/// its row, would need a gather. The rows past the last whole block go one
/// by one.
#[inline(always)]
fn across_rows(source: Plane, rows: std::ops::Range<usize>, taps: &Taps, width: usize) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let (in_row, out_row) = (source.width * 3, width * 3);
    let mut out = vec![0u8; rows.len() * out_row];
    let mut block = vec![0u8; in_row * BLOCK];
    // The block's output, on its side as the input is, set upright at the end.
    let mut sums_block = vec![0u8; out_row * BLOCK];
    for (b, out_rows) in out.chunks_mut(out_row * BLOCK).enumerate() {
        let y = rows.start + b * BLOCK;
        if out_rows.len() < out_row * BLOCK {
            for (k, out_row) in out_rows.chunks_exact_mut(out_row).enumerate() {
                across_row(&source.pixels[(y + k) * in_row..(y + k + 1) * in_row], taps, out_row);
            }
            continue;
        }
        sideways(&source.pixels[y * in_row..(y + BLOCK) * in_row], in_row, &mut block);
        for x in 0..width {
            let (first, weights) = taps.of(x, source.width);
            let mut sums = [[half; BLOCK]; 3];
            for (k, &w) in weights.iter().enumerate() {
                let at = (first + k) * 3 * BLOCK;
                let column: &[u8; 3 * BLOCK] = block[at..at + 3 * BLOCK].try_into().expect("a column of the block");
                for (sums, channel) in sums.iter_mut().zip(column.chunks_exact(BLOCK)) {
                    for (sum, &p) in sums.iter_mut().zip(channel) {
                        *sum += i32::from(p) * w;
                    }
                }
            }
            let bytes: &mut [u8; 3 * BLOCK] =
                (&mut sums_block[x * 3 * BLOCK..(x + 1) * 3 * BLOCK]).try_into().expect("a column of the block");
            for (bytes, sums) in bytes.chunks_exact_mut(BLOCK).zip(&sums) {
                for (byte, &sum) in bytes.iter_mut().zip(sums) {
                    *byte = clip8(sum);
                }
            }
        }
        upright(&sums_block, out_row, out_rows);
    }
    out
}

/// One row of the rows' pass, pixel by pixel, as Pillow writes it.
#[inline(always)]
fn across_row(row: &[u8], taps: &Taps, out: &mut [u8]) {
    let half = 1i32 << (PRECISION_BITS - 1);
    let input = row.len() / 3;
    for (x, out) in out.chunks_exact_mut(3).enumerate() {
        let (first, weights) = taps.of(x, input);
        let (mut r, mut g, mut b) = (half, half, half);
        for (p, &w) in row[first * 3..].chunks_exact(3).zip(weights) {
            r += i32::from(p[0]) * w;
            g += i32::from(p[1]) * w;
            b += i32::from(p[2]) * w;
        }
        out.copy_from_slice(&[clip8(r), clip8(g), clip8(b)]);
    }
}

/// `BLOCK` rows of `row` bytes each, turned on their side:
/// `block[i * BLOCK + r] = rows[r * row + i]`.
#[inline(always)]
fn sideways(rows: &[u8], row: usize, block: &mut [u8]) {
    assert_eq!((rows.len(), block.len()), (row * BLOCK, row * BLOCK));
    // The whole tiles of 16 bytes, then the rest one by one.
    #[cfg(target_arch = "x86_64")]
    let done = {
        let tiles = row / 16 * 16;
        for at in (0..tiles).step_by(16) {
            // Loops, not `array::from_fn` or `map`: LLVM left their closures as calls, a tenth of the pass.
            let mut lines = [&[0u8; 16]; BLOCK];
            for (r, line) in lines.iter_mut().enumerate() {
                *line = rows[r * row + at..].first_chunk().expect("16 bytes");
            }
            let out: &mut [u8; 16 * BLOCK] = (&mut block[at * BLOCK..(at + 16) * BLOCK]).try_into().expect("a tile");
            sideways_tile(lines, out);
        }
        tiles
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for i in done..row {
        for r in 0..BLOCK {
            block[i * BLOCK + r] = rows[r * row + i];
        }
    }
}

/// `block` set upright again, as `sideways` took it:
/// `rows[r * row + i] = block[i * BLOCK + r]`.
#[inline(always)]
fn upright(block: &[u8], row: usize, rows: &mut [u8]) {
    assert_eq!((rows.len(), block.len()), (row * BLOCK, row * BLOCK));
    #[cfg(target_arch = "x86_64")]
    let done = {
        let tiles = row / 16 * 16;
        for at in (0..tiles).step_by(16) {
            let tile: &[u8; 16 * BLOCK] = block[at * BLOCK..(at + 16) * BLOCK].try_into().expect("a tile");
            let lines = upright_tile(tile);
            for (r, line) in lines.iter().enumerate() {
                rows[r * row + at..r * row + at + 16].copy_from_slice(line);
            }
        }
        tiles
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for i in done..row {
        for r in 0..BLOCK {
            rows[r * row + i] = block[i * BLOCK + r];
        }
    }
}

/// Sixteen columns of eight bytes set upright, as eight rows of sixteen:
/// `sideways_tile` undone, in SSE2's interleaves of bytes, words, double
/// words and quad words.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn upright_tile(tile: &[u8; 16 * BLOCK]) -> [[u8; 16]; BLOCK] {
    use std::arch::x86_64::*;
    let mut lines = [[0u8; 16]; BLOCK];
    // SAFETY: each load reads eight bytes of `tile` (column `i`, at `i * 8`,
    // i < 16), each store writes the 16 bytes of one array of `lines`; SSE2
    // is part of x86-64, so every CPU this runs on has it.
    unsafe {
        // Loops of constant length, not `array::from_fn`, whose closures LLVM left as calls.
        let mut columns = [_mm_setzero_si128(); 16];
        for (i, column) in columns.iter_mut().enumerate() {
            *column = _mm_loadl_epi64(tile[i * 8..].as_ptr().cast());
        }
        // Columns i and i+1, byte by byte: (i, i+1) for each row.
        let mut pairs = [_mm_setzero_si128(); 8];
        for (k, pair) in pairs.iter_mut().enumerate() {
            *pair = _mm_unpacklo_epi8(columns[2 * k], columns[2 * k + 1]);
        }
        // Columns 4q..4q+3 for rows 0-3, then for rows 4-7.
        let mut quads = [_mm_setzero_si128(); 8];
        for (j, quad) in quads.iter_mut().enumerate() {
            let (q, high) = (j / 2, j % 2 == 1);
            let (a, b) = (pairs[2 * q], pairs[2 * q + 1]);
            *quad = if high { _mm_unpackhi_epi16(a, b) } else { _mm_unpacklo_epi16(a, b) };
        }
        // Columns 8h..8h+7 for rows (2p, 2p+1), p = 0..3, h = 0, 1.
        let mut eights = [_mm_setzero_si128(); 8];
        for (j, eight) in eights.iter_mut().enumerate() {
            let (h, p) = (j / 4, j % 4);
            // quads[2q] holds rows 0-3 of columns 4q..4q+3, quads[2q+1] rows 4-7.
            let (a, b) = (quads[4 * h + p / 2], quads[4 * h + 2 + p / 2]);
            *eight = if p % 2 == 1 { _mm_unpackhi_epi32(a, b) } else { _mm_unpacklo_epi32(a, b) };
        }
        for p in 0..4 {
            let (low, high) = (eights[p], eights[4 + p]);
            _mm_storeu_si128(lines[2 * p].as_mut_ptr().cast(), _mm_unpacklo_epi64(low, high));
            _mm_storeu_si128(lines[2 * p + 1].as_mut_ptr().cast(), _mm_unpackhi_epi64(low, high));
        }
    }
    lines
}

/// Sixteen bytes of eight rows turned on their side in SSE2's byte, word and
/// double-word interleaves (every x86-64 CPU has them): the transpose is a
/// fifth of the rows' pass in bytes moved one by one.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sideways_tile(lines: [&[u8; 16]; BLOCK], out: &mut [u8; 16 * BLOCK]) {
    use std::arch::x86_64::*;
    // SAFETY: each load reads the 16 bytes of one array, the stores write
    // the 128 bytes of `out` in eight 16-byte pieces; SSE2 is part of
    // x86-64, so every CPU this runs on has it.
    unsafe {
        let mut l = [_mm_setzero_si128(); BLOCK];
        for (l, line) in l.iter_mut().zip(lines) {
            *l = _mm_loadu_si128(line.as_ptr().cast());
        }
        let bytes = [
            _mm_unpacklo_epi8(l[0], l[1]),
            _mm_unpackhi_epi8(l[0], l[1]),
            _mm_unpacklo_epi8(l[2], l[3]),
            _mm_unpackhi_epi8(l[2], l[3]),
            _mm_unpacklo_epi8(l[4], l[5]),
            _mm_unpackhi_epi8(l[4], l[5]),
            _mm_unpacklo_epi8(l[6], l[7]),
            _mm_unpackhi_epi8(l[6], l[7]),
        ];
        // Columns 0-3, 4-7, 8-11 and 12-15 of rows 0-3, then of rows 4-7.
        let words = [
            _mm_unpacklo_epi16(bytes[0], bytes[2]),
            _mm_unpackhi_epi16(bytes[0], bytes[2]),
            _mm_unpacklo_epi16(bytes[1], bytes[3]),
            _mm_unpackhi_epi16(bytes[1], bytes[3]),
            _mm_unpacklo_epi16(bytes[4], bytes[6]),
            _mm_unpackhi_epi16(bytes[4], bytes[6]),
            _mm_unpacklo_epi16(bytes[5], bytes[7]),
            _mm_unpackhi_epi16(bytes[5], bytes[7]),
        ];
        for quarter in 0..4 {
            let (low, high) = (words[quarter], words[quarter + 4]);
            let columns = [_mm_unpacklo_epi32(low, high), _mm_unpackhi_epi32(low, high)];
            for (half, columns) in columns.into_iter().enumerate() {
                let at = (quarter * 2 + half) * 16;
                _mm_storeu_si128(out[at..at + 16].as_mut_ptr().cast(), columns);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{encode, numbers, red};
    use super::*;
    use crate::image::{Decoding, prepare};
    use image::{ImageFormat, RgbImage};

    #[test]
    fn resizes_to_the_requested_size_keeping_colour() {
        let png = encode(&red(300, 200), ImageFormat::Png);
        let pixels = prepare(&png, true, 224, 224, Decoding::Exact).unwrap();
        assert_eq!(pixels.len(), 224 * 224 * 3);
        assert!(pixels.chunks(3).all(|p| p == [220, 20, 20]));
    }

    #[test]
    fn converts_16_bit_and_grayscale_to_rgb() {
        let deep = DynamicImage::ImageRgb16(red(64, 48).to_rgb16());
        let pixels = prepare(&encode(&deep, ImageFormat::Png), true, 32, 32, Decoding::Exact).unwrap();
        assert!(pixels.chunks(3).all(|p| p == [220, 20, 20]));
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(40, 40, image::Luma([77])));
        let pixels = prepare(&encode(&gray, ImageFormat::Jpeg), true, 16, 16, Decoding::Exact).unwrap();
        assert!(pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2] && p[0].abs_diff(77) <= 2));
    }

    #[test]
    fn rows_in_blocks_match_rows_one_by_one() {
        // Widths around the 16-byte tiles of the transpose, heights around
        // the eight-row blocks, reductions and enlargements.
        let mut next = numbers(0x9e37_79b9);
        let mut byte = move || (next() >> 24) as u8;
        for (in_width, height, out_width) in
            [(1, 8, 3), (5, 9, 2), (6, 16, 5), (21, 7, 8), (37, 17, 224), (300, 24, 224), (1201, 33, 224)]
        {
            let pixels: Vec<u8> = (0..in_width * height * 3).map(|_| byte()).collect();
            let source = Plane { pixels: &pixels, width: in_width, height };
            let taps = Taps::bilinear(in_width, out_width);
            let blocks = across_rows(source, 0..height, &taps, out_width);
            let mut one_by_one = vec![0u8; height * out_width * 3];
            for (row, out) in pixels.chunks_exact(in_width * 3).zip(one_by_one.chunks_exact_mut(out_width * 3)) {
                across_row(row, &taps, out);
            }
            assert!(blocks == one_by_one, "{in_width}x{height} to {out_width} wide");
            // From a row past the first, as the columns' pass asks.
            let from = across_rows(source, 3..height, &taps, out_width);
            assert!(from[..] == one_by_one[3 * out_width * 3..], "{in_width}x{height} from row 3");
        }
    }

    fn fixture_rgb(name: &str) -> RgbImage {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/").to_owned() + name;
        image::open(&path).unwrap_or_else(|e| panic!("{path}: {e} (fixtures/make_images.py makes it)")).to_rgb8()
    }

    /// Milliseconds a corpus photo, decoded whole, takes to the birds
    /// model's size: `cargo test --release --lib resize_time -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn resize_time() {
        let Some(photos) = super::super::testing::shared_jpegs(&["birds/corpus"]) else { return };
        let images: Vec<_> = photos.iter().map(|(_, bytes)| super::super::decode(bytes, false).unwrap()).collect();
        for _ in 0..3 {
            let round = images.clone();
            let started = std::time::Instant::now();
            for image in round {
                std::hint::black_box(resize(image, 224, 224).unwrap());
            }
            eprintln!("{} photos: {:?} a photo", images.len(), started.elapsed() / images.len() as u32);
        }
    }

    #[test]
    fn matches_pillow_bilinear_on_a_non_square_non_uniform_image() {
        let source = fixture_rgb("resize_source.png");
        let expected = fixture_rgb("resize_pillow_24x50.png");
        assert_eq!((source.dimensions(), expected.dimensions()), ((61, 37), (24, 50)));
        let ours = resize(DynamicImage::ImageRgb8(source), 24, 50).unwrap();
        // To the bit: the quantized model's steps turn on single pixel
        // values. A nearest-pixel filter, a four-tap bilinear that does not
        // widen on the 61 to 24 reduction, or swapped axes were 105 to 207
        // steps off when tried; weights rounded to 16 bits (fast_image_resize)
        // one step off in a channel of seven.
        let differ = ours.iter().zip(expected.as_raw()).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{differ} channels differ from Pillow's");
    }
}
