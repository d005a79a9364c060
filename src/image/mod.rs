//! The decode stage: image bytes to the model's input, 8-bit RGB at its size.
//!
//! Every format the `image` crate reads is accepted; 16-bit, grayscale,
//! alpha and CMYK images are converted to 8-bit RGB. The image is squashed to
//! the model's size with a bilinear (triangle) filter that widens with the
//! reduction, as Pillow's `resize(BILINEAR)` does, which is what the reference
//! outputs were computed with.

use std::io::Cursor;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageReader};

/// Images with a side longer than this are refused before any pixel is decoded.
pub const MAX_SIDE: u32 = 16_384;
/// The most one decode may allocate.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty body")]
    Empty,
    #[error("not an image ({0})")]
    NotAnImage(String),
    #[error("image of {width}x{height} pixels is larger than the limit of {MAX_SIDE}x{MAX_SIDE}")]
    TooLarge { width: u32, height: u32 },
    #[error("cannot decode {format} image: {reason}")]
    Corrupt { format: String, reason: String },
    #[error("cannot resize image: {0}")]
    Resize(String),
}

/// Decodes `bytes` into an image, refusing oversized ones from their header.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::NotAnImage(e.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(DecodeError::NotAnImage(describe_content(bytes)));
    };
    let format_name = format!("{format:?}").to_uppercase();
    let corrupt = |reason: String| DecodeError::Corrupt { format: format_name.clone(), reason };
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader = reader;
    reader.limits(limits);
    // Read the dimensions first, so the error can name them.
    let (width, height) =
        ImageReader::with_format(Cursor::new(bytes), format).into_dimensions().map_err(|e| corrupt(e.to_string()))?;
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(DecodeError::TooLarge { width, height });
    }
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => DecodeError::TooLarge { width, height },
        e => corrupt(e.to_string()),
    })
}

/// Converts `image` to 8-bit RGB and resizes it to `width` x `height`.
pub fn resize(image: DynamicImage, width: u32, height: u32) -> Result<Vec<u8>, DecodeError> {
    let rgb = match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    };
    if rgb.dimensions() == (width, height) {
        return Ok(rgb.into_raw());
    }
    let (src_width, src_height) = rgb.dimensions();
    let src = ImageRef::new(src_width, src_height, rgb.as_raw(), PixelType::U8x3)
        .map_err(|e| DecodeError::Resize(e.to_string()))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).map_err(|e| DecodeError::Resize(e.to_string()))?;
    Ok(dst.into_vec())
}

/// Decodes and resizes: the whole stage for one image.
pub fn prepare(bytes: &[u8], width: u32, height: u32) -> Result<Vec<u8>, DecodeError> {
    resize(decode(bytes)?, width, height)
}

/// A short description of content that is not an image, for error messages.
fn describe_content(bytes: &[u8]) -> String {
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).to_ascii_lowercase();
    let head = head.trim_start();
    if head.starts_with("<!doctype html") || head.starts_with("<html") || head.contains("<body") {
        "the content is an HTML page".into()
    } else if head.starts_with('{') || head.starts_with('[') {
        "the content looks like JSON".into()
    } else if bytes.iter().take(512).all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()) {
        "the content is text".into()
    } else {
        "unknown format".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb, RgbImage};

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(vec![]);
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn red(width: u32, height: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_pixel(width, height, Rgb([220, 20, 20])))
    }

    #[test]
    fn resizes_to_the_requested_size_keeping_colour() {
        let png = encode(&red(300, 200), ImageFormat::Png);
        let pixels = prepare(&png, 224, 224).unwrap();
        assert_eq!(pixels.len(), 224 * 224 * 3);
        assert!(pixels.chunks(3).all(|p| p == [220, 20, 20]));
    }

    #[test]
    fn converts_16_bit_and_grayscale_to_rgb() {
        let deep = DynamicImage::ImageRgb16(red(64, 48).to_rgb16());
        let pixels = prepare(&encode(&deep, ImageFormat::Png), 32, 32).unwrap();
        assert!(pixels.chunks(3).all(|p| p == [220, 20, 20]));
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(40, 40, image::Luma([77])));
        let pixels = prepare(&encode(&gray, ImageFormat::Jpeg), 16, 16).unwrap();
        assert!(pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2] && p[0].abs_diff(77) <= 2));
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(matches!(prepare(b"", 8, 8), Err(DecodeError::Empty)));
        let html = b"<!DOCTYPE html><html><body>Not found</body></html>";
        assert_eq!(prepare(html, 8, 8).unwrap_err().to_string(), "not an image (the content is an HTML page)");
        let jpeg = encode(&red(64, 64), ImageFormat::Jpeg);
        let err = prepare(&jpeg[..jpeg.len() / 2], 8, 8).unwrap_err();
        assert!(err.to_string().starts_with("cannot decode JPEG image"), "{err}");
    }

    #[test]
    fn refuses_huge_images_from_the_header() {
        let mut png = encode(&red(1, 1), ImageFormat::Png);
        // Patch the IHDR chunk to claim 50000x50000 pixels (7.5 GB as RGB).
        png[16..20].copy_from_slice(&50_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&50_000u32.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&png[12..29]);
        png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        let err = prepare(&png, 8, 8).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { width: 50_000, height: 50_000 }), "{err}");
        assert_eq!(err.to_string(), "image of 50000x50000 pixels is larger than the limit of 16384x16384");
    }
}
