//! The decode stage: image bytes to the model's input, 8-bit RGB at its size.
//!
//! Two jobs with different failure modes, so two files: [`decode`] turns
//! untrusted bytes into an image under limits and says what is wrong when it
//! cannot (the messages are part of the JSON Lines output); [`resize`] cannot
//! fail on a decoded image and has to match how the reference outputs were
//! computed (Pillow's `resize(BILINEAR)`). They are called apart when the
//! model's size is not known yet at decode time.

mod decode;
mod jpeg;
mod resize;

pub use decode::{DecodeError, MAX_DECODE_BYTES, MAX_JPEG_SCANS, MAX_SIDE, decode, decode_for, decode_memory};
pub use resize::resize;

/// How a JPEG is decoded for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decoding {
    /// Whole, then resized as Pillow resizes: the pixels the reference
    /// runtime's outputs were computed from, to the bit.
    #[default]
    Exact,
    /// Reduced in the DCT domain by 1/2, 1/4 or 1/8 as far as the model's
    /// input allows, then resized: less work for a large photo, and pixels
    /// a little off Pillow's.
    Fast,
}

/// Decodes (turned as its EXIF orientation says, with `exif_orientation`)
/// and resizes, a JPEG decoded as `decoding` says: the whole stage for one
/// image.
pub fn prepare(
    bytes: &[u8],
    exif_orientation: bool,
    width: u32,
    height: u32,
    decoding: Decoding,
) -> Result<Vec<u8>, DecodeError> {
    let wanted = match decoding {
        Decoding::Exact => None,
        Decoding::Fast => Some((width, height)),
    };
    resize(decode_for(bytes, exif_orientation, wanted)?, width, height)
}

#[cfg(test)]
mod testing {
    use std::io::Cursor;

    use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

    pub fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(vec![]);
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    /// Reproducible pseudo-random numbers (xorshift32) for test inputs.
    pub fn numbers(seed: u32) -> impl FnMut() -> u32 {
        let mut state = seed | 1;
        move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        }
    }

    /// A file of the project's own `fixtures/`.
    pub fn fixture(name: &str) -> Vec<u8> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/").to_owned() + name;
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (fixtures/make_images.py makes it)"))
    }

    /// The photos beside the project, or None with a message when a clone
    /// alone does not have them.
    pub fn shared_jpegs(dirs: &[&str]) -> Option<Vec<(String, Vec<u8>)>> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
        if !root.is_dir() {
            eprintln!("skipped: {} is absent", root.display());
            return None;
        }
        let mut jpegs = vec![];
        for dir in dirs {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                if bytes.starts_with(&[0xFF, 0xD8]) {
                    jpegs.push((path.display().to_string(), bytes));
                }
            }
        }
        Some(jpegs)
    }

    pub fn red(width: u32, height: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_pixel(width, height, Rgb([220, 20, 20])))
    }
}
