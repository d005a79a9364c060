//! Untrusted bytes to a decoded image, under limits.
//!
//! Bytes come from anywhere (URLs that answer with an HTML error page, files
//! cut short by a failed download), so this is where every refusal is decided
//! and named: a caller prints the message as the image's record. Oversized
//! images are refused from their header, before any pixel is allocated.

use std::io::Cursor;

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
    fn names_what_is_wrong() {
        assert!(matches!(decode(b""), Err(DecodeError::Empty)));
        let html = b"<!DOCTYPE html><html><body>Not found</body></html>";
        assert_eq!(decode(html).unwrap_err().to_string(), "not an image (the content is an HTML page)");
        let jpeg = encode(&red(64, 64), ImageFormat::Jpeg);
        let err = decode(&jpeg[..jpeg.len() / 2]).unwrap_err();
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
        let err = decode(&png).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { width: 50_000, height: 50_000 }), "{err}");
        assert_eq!(err.to_string(), "image of 50000x50000 pixels is larger than the limit of 16384x16384");
    }
}
