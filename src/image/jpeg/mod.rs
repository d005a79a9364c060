//! JPEGs through libjpeg-turbo, reduced in the DCT domain where the model's
//! input is much smaller than the photo.
//!
//! libjpeg-turbo is what Pillow decodes with, so at full scale the pixels are
//! those the reference outputs were computed from; on the progressive photos
//! that most cameras and sites now write it is faster than zune-jpeg. And it
//! can return 1/2, 1/4 or 1/8 of the image from the low frequencies of each
//! block, which saves the inverse transform, the colour conversion and most
//! of the resize for a photo many times the model's size.
//!
//! What it does not take (CMYK and YCCK photos, a header it cannot read, a
//! warning about corrupt data, a decode past the memory budget) is left to
//! the image crate's decoder, which decided those cases before this path
//! existed: this path may only make a decode faster, never refuse one.

mod pixels;
mod progressive;

use image::RgbImage;
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor, Subsamp};

/// The largest reduction, as the denominator of 1/1, 1/2, 1/4 or 1/8, that
/// leaves an image of `width` x `height` at least `wanted` on both sides
/// (libjpeg-turbo rounds a reduced side up).
pub fn reduction(width: u32, height: u32, wanted: Option<(u32, u32)>) -> u32 {
    let Some((wanted_width, wanted_height)) = wanted else { return 1 };
    [8, 4, 2]
        .into_iter()
        .find(|&d| width.div_ceil(d) >= wanted_width && height.div_ceil(d) >= wanted_height)
        .unwrap_or(1)
}

/// `bytes` decoded to RGB at 1/`reduction` of its size, or None where the
/// image crate's decoder is to decide (the reason is logged at debug level).
/// `budget` bounds what the decode allocates; `multi_scan` says whether the
/// file has more than one scan (the caller has counted them), which makes
/// libjpeg keep the whole image's coefficients.
pub fn decode(bytes: &[u8], reduction: u32, multi_scan: bool, budget: u64) -> Option<RgbImage> {
    if multi_scan {
        match progressive_or_why(bytes, reduction, budget) {
            Ok(image) => return Some(image),
            Err(why) => tracing::debug!("the progressive decoder left the JPEG to libjpeg-turbo: {why}"),
        }
    }
    decode_or_why(bytes, reduction, multi_scan, budget)
        .map_err(|why| tracing::debug!("libjpeg-turbo left the JPEG: {why}"))
        .ok()
}

/// A progressive JPEG's scans decoded by [`progressive`], its pixels made
/// by libjpeg-turbo from the coefficients: the pixels of [`decode_or_why`],
/// in about half the time (BENCHMARKS.md).
fn progressive_or_why(bytes: &[u8], reduction: u32, budget: u64) -> Result<RgbImage, String> {
    let coefficients = progressive::decode(bytes, budget)?;
    let (width, height, pixels) = pixels::rgb(&coefficients, reduction as usize)?;
    drop(coefficients);
    rgb_image(width, height, pixels)
}

fn decode_or_why(bytes: &[u8], reduction: u32, multi_scan: bool, budget: u64) -> Result<RgbImage, String> {
    let mut decompressor = Decompressor::new().map_err(|e| e.to_string())?;
    // The caller refuses files of more scans; this holds should its count
    // and libjpeg's ever differ.
    decompressor.set_scan_limit(super::MAX_JPEG_SCANS as u32).map_err(|e| e.to_string())?;
    let header = decompressor.read_header(bytes).map_err(|e| e.to_string())?;
    if !matches!(header.colorspace, Colorspace::YCbCr | Colorspace::Gray | Colorspace::RGB) {
        return Err(format!("{:?} colour space", header.colorspace));
    }
    // Lossless JPEGs have no DCT to reduce in.
    let reduction = if header.is_lossless { 1 } else { reduction as usize };
    let factor = ScalingFactor::new(1, reduction);
    let scaled = header.scaled(factor);
    let whole_image_buffered = header.is_progressive || multi_scan;
    let needs = memory(header.width, header.height, scaled.width, scaled.height, whole_image_buffered, header.subsamp);
    if needs > budget {
        return Err(format!("{needs} bytes to decode, over the budget of {budget}"));
    }
    decompressor.set_scaling_factor(factor).map_err(|e| e.to_string())?;
    let (width, height) = (scaled.width, scaled.height);
    let mut output =
        Image { pixels: vec![0; width * height * 3], width, pitch: width * 3, height, format: PixelFormat::RGB };
    decompressor.decompress(bytes, output.as_deref_mut()).map_err(|e| e.to_string())?;
    rgb_image(width, height, output.pixels)
}

/// Decoded RGB rows as the image crate's image.
fn rgb_image(width: usize, height: usize, pixels: Vec<u8>) -> Result<RgbImage, String> {
    let size = |side: usize| u32::try_from(side).map_err(|_| format!("a side of {side} pixels"));
    RgbImage::from_raw(size(width)?, size(height)?, pixels).ok_or_else(|| "no room for the pixels".into())
}

/// What a decode allocates at most, near enough to bound it: the RGB output,
/// and for a JPEG of several scans the whole image's DCT coefficients (two
/// bytes each, every component at its sampling, blocks padded to the MCU),
/// which libjpeg keeps at full size whatever the reduction. Progressive files
/// have several scans; so do baseline files that code their components in
/// scans of their own (libjpeg's `has_multiple_scans`, jdinput.c).
fn memory(
    width: usize,
    height: usize,
    out_width: usize,
    out_height: usize,
    whole_image_buffered: bool,
    subsamp: Subsamp,
) -> u64 {
    let output = (out_width * out_height * 3) as u64;
    if !whole_image_buffered {
        return output;
    }
    let padded = (width.div_ceil(16) * 16 * height.div_ceil(16) * 16) as u64;
    // Samples per pixel over all components: luma, plus the chroma planes.
    let samples_per_4_pixels = match subsamp {
        Subsamp::Gray => 4,
        Subsamp::Sub2x2 | Subsamp::Sub4x1 | Subsamp::Sub1x4 => 6,
        Subsamp::Sub2x1 | Subsamp::Sub1x2 => 8,
        _ => 12,
    };
    output + padded * samples_per_4_pixels / 4 * 2
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fixture, numbers, shared_jpegs};
    use super::*;

    /// The progressive decoder's pixels, which must be libjpeg-turbo's own.
    fn assert_same_pixels(name: &str, jpeg: &[u8], reduction: u32) {
        let ours = progressive_or_why(jpeg, reduction, u64::MAX).unwrap_or_else(|why| panic!("{name}: {why}"));
        let theirs = decode_or_why(jpeg, reduction, true, u64::MAX).unwrap_or_else(|why| panic!("{name}: {why}"));
        assert_eq!(ours.dimensions(), theirs.dimensions(), "{name} at 1/{reduction}");
        let first = ours.pixels().zip(theirs.pixels()).position(|(a, b)| a != b);
        assert!(first.is_none(), "{name} at 1/{reduction}: pixel {first:?} differs");
    }

    fn is_progressive(jpeg: &[u8]) -> bool {
        Decompressor::new().unwrap().read_header(jpeg).unwrap().is_progressive
    }

    #[test]
    fn progressive_photos_get_libjpeg_turbos_pixels() {
        let Some(photos) = shared_jpegs(&["birds/images", "birds/corpus", "imagenet/images", "models/images"]) else {
            return;
        };
        let mut progressive = 0;
        for (i, (name, photo)) in photos.iter().enumerate() {
            if !is_progressive(photo) {
                let why = progressive::decode(photo, u64::MAX).err();
                assert!(why.is_some_and(|why| why.contains("not one progressive")), "{name}");
                continue;
            }
            progressive += 1;
            assert_same_pixels(name, photo, 1);
            // The reduced decodes (--decode fast) go the same way.
            assert_same_pixels(name, photo, [2, 4, 8][i % 3]);
        }
        assert!(progressive >= 140, "{progressive} progressive photos");
    }

    /// Noise over gradients, so that every block has coefficients to refine.
    fn noisy(width: usize, height: usize, seed: usize) -> Vec<u8> {
        let mut next = numbers(seed as u32);
        let mut pixels = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                for channel in 0..3 {
                    let smooth = (x * 255 / width.max(2) + y * 100 / height.max(2) + channel * 70) as u32;
                    pixels.push((smooth + next() % 64) as u8);
                }
            }
        }
        pixels
    }

    #[test]
    fn progressive_files_of_every_shape_get_libjpeg_turbos_pixels() {
        let shapes = [(1, 1), (7, 9), (8, 8), (17, 33), (64, 48), (123, 77), (300, 201)];
        let subsamplings = [Subsamp::None, Subsamp::Sub2x1, Subsamp::Sub2x2, Subsamp::Sub1x2, Subsamp::Gray];
        let mut files = 0;
        for (s, &(width, height)) in shapes.iter().enumerate() {
            for (k, &subsamp) in subsamplings.iter().enumerate() {
                let pixels = noisy(width, height, s * 7 + k);
                let image = Image { pixels: &pixels[..], width, pitch: width * 3, height, format: PixelFormat::RGB };
                let mut compressor = turbojpeg::Compressor::new().unwrap();
                compressor.set_progressive(true).unwrap();
                compressor.set_subsamp(subsamp).unwrap();
                compressor.set_quality([100, 90, 75, 40, 10][(s + k) % 5]).unwrap();
                compressor.set_optimize((s + k) % 2 == 0).unwrap();
                let jpeg = compressor.compress_to_vec(image).unwrap();
                let name = format!("{width}x{height} {subsamp:?}");
                assert_same_pixels(&name, &jpeg, 1);
                assert_same_pixels(&name, &jpeg, [2, 4, 8][(s + k) % 3]);
                files += 1;
            }
        }
        assert_eq!(files, shapes.len() * subsamplings.len());
    }

    /// The contract, on thousands of damaged files: the progressive path
    /// gives libjpeg-turbo's pixels or leaves the file to it, and never
    /// decodes what libjpeg-turbo would refuse or warn about.
    #[test]
    fn damaged_progressive_files_get_libjpeg_turbos_pixels_or_go_to_it() {
        let mut next = numbers(0x2545_F491);
        let budget = 64 << 20;
        let (mut decoded, mut left) = (0, 0);
        for name in ["progressive.jpg", "progressive_restarts.jpg"] {
            let jpeg = fixture(name);
            for variant in 0..1500 {
                let mut damaged = jpeg.clone();
                let at = next() as usize % damaged.len();
                match next() % 3 {
                    0 => damaged[at] ^= 1 << (next() % 8),
                    1 => damaged[at] = next() as u8,
                    _ => damaged.insert(at, next() as u8),
                }
                let Ok(ours) = progressive_or_why(&damaged, 1, budget) else {
                    left += 1;
                    continue;
                };
                let theirs = decode_or_why(&damaged, 1, true, budget).unwrap_or_else(|why| {
                    panic!("{name}, variant {variant}: decoded what libjpeg-turbo refuses ({why})")
                });
                assert!(ours == theirs, "{name}, variant {variant}: other pixels than libjpeg-turbo's");
                decoded += 1;
            }
        }
        // Most damage lands in the scans' data, where a flipped bit can
        // still be a valid file; the rest is refused.
        assert!(decoded > 300 && left > 300, "{decoded} decoded, {left} left to libjpeg-turbo");
    }

    #[test]
    fn restart_intervals_are_decoded_and_checked() {
        let jpeg = fixture("progressive_restarts.jpg");
        assert_same_pixels("progressive_restarts.jpg", &jpeg, 1);
        // A restart marker out of its turn is libjpeg's to resynchronize.
        let rst = jpeg.windows(2).rposition(|w| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1])).unwrap();
        let mut swapped = jpeg.clone();
        swapped[rst + 1] = 0xD0 + (swapped[rst + 1] - 0xD0 + 1) % 8;
        let why = progressive::decode(&swapped, u64::MAX).err().unwrap();
        assert!(why.contains("restart markers out of order"), "{why}");
    }

    #[test]
    fn what_libjpeg_would_warn_of_is_left_to_it() {
        let jpeg = fixture("progressive.jpg");
        assert_same_pixels("progressive.jpg", &jpeg, 1);
        // Cut inside its last scan's data, with an end marker: libjpeg fills
        // in zeros and warns.
        let last_scan = jpeg.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
        let cut = [&jpeg[..(last_scan + jpeg.len()) / 2], &[0xFF, 0xD9]].concat();
        let why = progressive::decode(&cut, u64::MAX).err().unwrap();
        assert!(why.contains("ends too soon"), "{why}");
        // Bytes that belong to no scan, before the last scan's end marker.
        let end = jpeg.len() - 2;
        let padded = [&jpeg[..end], &[0x12, 0x34, 0x56], &jpeg[end..]].concat();
        let why = progressive::decode(&padded, u64::MAX).err().unwrap();
        assert!(why.contains("bytes left over"), "{why}");
        // A last scan missing: its coefficients are left unrefined.
        let short = [&jpeg[..last_scan], &[0xFF, 0xD9]].concat();
        let why = progressive::decode(&short, u64::MAX).err().unwrap();
        assert!(why.contains("unrefined"), "{why}");
        assert!(decode(&short, 1, true, u64::MAX).is_some(), "libjpeg-turbo decodes it, smoothed");
        // An ICC profile of chunk 2 of 1: libjpeg-turbo warns as it reads the header.
        let icc = [&[0xFF, 0xE2, 0, 16][..], b"ICC_PROFILE\0", &[2, 1]].concat();
        let bogus_icc = [&jpeg[..2], &icc, &jpeg[2..]].concat();
        assert!(decode_or_why(&bogus_icc, 1, true, u64::MAX).is_err());
        let why = progressive_or_why(&bogus_icc, 1, u64::MAX).err().unwrap();
        assert!(why.contains("ICC"), "{why}");
        // The first (DC) scan's components listed backwards: libjpeg refuses it.
        let first_scan = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        assert_eq!(jpeg[first_scan + 4], 3, "an interleaved first scan");
        let mut backwards = jpeg.clone();
        backwards.copy_within(first_scan + 5..first_scan + 7, first_scan + 9);
        backwards[first_scan + 5..first_scan + 7].copy_from_slice(&jpeg[first_scan + 9..first_scan + 11]);
        assert!(decode_or_why(&backwards, 1, true, u64::MAX).is_err());
        let why = progressive::decode(&backwards, u64::MAX).err().unwrap();
        assert!(why.contains("out of the frame's order"), "{why}");
        // Over the budget: the coefficients are not allocated.
        let why = progressive::decode(&jpeg, 1000).err().unwrap();
        assert!(why.contains("over the budget"), "{why}");
    }

    #[test]
    fn reduces_as_far_as_the_wanted_size_allows() {
        assert_eq!(reduction(4000, 3000, Some((224, 224))), 8);
        assert_eq!(reduction(1792, 1792, Some((224, 224))), 8);
        // One pixel short of 8x on a side: 1791 / 8 rounds up to 224.
        assert_eq!(reduction(1791, 1791, Some((224, 224))), 8);
        assert_eq!(reduction(1784, 1800, Some((224, 224))), 4);
        assert_eq!(reduction(1024, 683, Some((224, 224))), 2);
        assert_eq!(reduction(447, 1000, Some((224, 224))), 2);
        assert_eq!(reduction(446, 1000, Some((224, 224))), 1);
        assert_eq!(reduction(224, 224, Some((224, 224))), 1);
        assert_eq!(reduction(100, 80, Some((224, 224))), 1);
        // Each side against its own wanted side.
        assert_eq!(reduction(1000, 200, Some((224, 24))), 4);
        assert_eq!(reduction(4000, 3000, None), 1);
    }

    #[test]
    fn leaves_to_the_other_decoder_what_it_should_not_decide() {
        let progressive = fixture("progressive.jpg");
        let whole = decode(&progressive, 1, true, u64::MAX).expect("a progressive JPEG");
        let needs = (whole.width() * whole.height() * 3) as u64;
        // Its coefficients on top of its pixels: past a budget of its pixels.
        assert!(decode(&progressive, 1, true, needs).is_none());
        assert!(decode(&progressive, 1, true, needs * 4).is_some());
        assert!(decode(&fixture("cmyk_red.jpg"), 1, false, u64::MAX).is_none());
        // A warning about corrupt data is the other decoder's to judge.
        let cut = [&progressive[..progressive.len() / 2], &[0xFF, 0xD9]].concat();
        assert!(decode(&cut, 1, true, u64::MAX).is_none());
    }

    #[test]
    fn a_baseline_jpeg_of_several_scans_counts_its_coefficients() {
        let multi_scan = fixture("multiscan_baseline.jpg");
        let whole = decode(&multi_scan, 1, true, u64::MAX).expect("a baseline JPEG of three scans");
        let pixels = (whole.width() * whole.height() * 3) as u64;
        assert!(decode(&multi_scan, 1, true, pixels).is_none());
        assert!(decode(&multi_scan, 1, true, pixels * 4).is_some());
    }

    #[test]
    fn a_progressive_decode_counts_its_coefficients() {
        let baseline = memory(1000, 1000, 250, 250, false, Subsamp::Sub2x2);
        assert_eq!(baseline, 250 * 250 * 3);
        // 1008 x 1008 padded, 1.5 samples a pixel, 2 bytes a sample.
        assert_eq!(memory(1000, 1000, 250, 250, true, Subsamp::Sub2x2), baseline + 1008 * 1008 * 3);
        assert_eq!(memory(1000, 1000, 250, 250, true, Subsamp::None), baseline + 1008 * 1008 * 6);
    }
}
/// Not a test but a measurement (BENCHMARKS.md): the corpus's progressive
/// photos decoded to coefficients here, and by libjpeg-turbo at 1/8 (its
/// entropy decoding and little else), one thread, per photo:
/// `cargo test --release --lib progressive_decode_time -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    #[test]
    #[ignore]
    fn progressive_decode_time() {
        let Some(photos) = super::super::testing::shared_jpegs(&["birds/corpus"]) else { return };
        let photos: Vec<_> =
            photos.into_iter().filter(|(_, p)| super::progressive::decode(p, u64::MAX).is_ok()).collect();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for (_, p) in &photos {
                std::hint::black_box(super::progressive::decode(p, u64::MAX).unwrap());
            }
            let ours = t.elapsed();
            let t = std::time::Instant::now();
            for (_, p) in &photos {
                std::hint::black_box(super::decode_or_why(p, 8, true, u64::MAX).unwrap());
            }
            let theirs = t.elapsed();
            eprintln!(
                "{} photos: coefficients {:?}, libjpeg at 1/8 {:?}",
                photos.len(),
                ours / photos.len() as u32,
                theirs / photos.len() as u32
            );
        }
    }
}
