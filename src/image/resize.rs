//! Any decoded image to 8-bit RGB at the model's size.
//!
//! 16-bit, grayscale, alpha and CMYK-decoded images are converted to 8-bit
//! RGB. The image is squashed to the model's size with a bilinear (triangle)
//! filter that widens with the reduction, as Pillow's `resize(BILINEAR)` does,
//! which is what the reference outputs were computed with: a filter that only
//! samples four pixels, as most "bilinear" resizers do, would alias on large
//! photos and move the scores.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::DynamicImage;

use super::DecodeError;

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

#[cfg(test)]
mod tests {
    use super::super::testing::{encode, red};
    use super::*;
    use crate::image::prepare;
    use image::{ImageFormat, RgbImage};

    #[test]
    fn resizes_to_the_requested_size_keeping_colour() {
        let png = encode(&red(300, 200), ImageFormat::Png);
        let pixels = prepare(&png, true, 224, 224).unwrap();
        assert_eq!(pixels.len(), 224 * 224 * 3);
        assert!(pixels.chunks(3).all(|p| p == [220, 20, 20]));
    }

    #[test]
    fn converts_16_bit_and_grayscale_to_rgb() {
        let deep = DynamicImage::ImageRgb16(red(64, 48).to_rgb16());
        let pixels = prepare(&encode(&deep, ImageFormat::Png), true, 32, 32).unwrap();
        assert!(pixels.chunks(3).all(|p| p == [220, 20, 20]));
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(40, 40, image::Luma([77])));
        let pixels = prepare(&encode(&gray, ImageFormat::Jpeg), true, 16, 16).unwrap();
        assert!(pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2] && p[0].abs_diff(77) <= 2));
    }

    fn fixture_rgb(name: &str) -> RgbImage {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/").to_owned() + name;
        image::open(&path).unwrap_or_else(|e| panic!("{path}: {e} (fixtures/make_images.py makes it)")).to_rgb8()
    }

    #[test]
    fn matches_pillow_bilinear_on_a_non_square_non_uniform_image() {
        let source = fixture_rgb("resize_source.png");
        let expected = fixture_rgb("resize_pillow_24x50.png");
        assert_eq!((source.dimensions(), expected.dimensions()), ((61, 37), (24, 50)));
        let ours = resize(DynamicImage::ImageRgb8(source), 24, 50).unwrap();
        // Not exact: both work in fixed point, but fast_image_resize rounds
        // its weights to 16-bit integers where Pillow keeps 22 bits of 32, so
        // about one channel in seven lands one step apart. A nearest-pixel
        // filter, a four-tap bilinear that does not widen on the 61 to 24
        // reduction, or swapped axes were 105 to 207 steps off when tried.
        let worst = ours.iter().zip(expected.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 1, "a channel differs from Pillow's by {worst}");
    }
}
