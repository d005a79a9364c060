//! Untrusted bytes to a decoded image, under limits.
//!
//! Bytes come from anywhere (URLs that answer with an HTML error page, files
//! cut short by a failed download), so this is where every refusal is decided
//! and named: a caller prints the message as the image's record. Oversized
//! images are refused from their header, before any pixel is allocated.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

/// Images with a side longer than this are refused before any pixel is decoded.
pub const MAX_SIDE: u32 = 16_384;
/// The most one decode may allocate.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// JPEGs with more scans than this are refused. A progressive photo has about
/// ten; each scan may touch every coefficient of the image again, so a file
/// of thousands of tiny scans costs a decoder minutes of CPU (libjpeg-turbo
/// suggests 500 as the limit against it).
pub const MAX_JPEG_SCANS: usize = 500;

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
    /// The data stops before the image's end: the decoder would fill the rest
    /// with grey and the model would classify half a photo as a whole one.
    #[error("cannot decode {format} image: the file is truncated ({detail})")]
    Truncated { format: String, detail: String },
    #[error("cannot decode JPEG image: {scans} scans, more than the limit of {MAX_JPEG_SCANS}")]
    TooManyScans { scans: usize },
    #[error("cannot resize image: {0}")]
    Resize(String),
}

/// Decodes `bytes` into an image, refusing oversized ones from their header.
/// With `exif_orientation`, the image is turned as its EXIF orientation tag
/// says (JPEG, TIFF and WebP carry one), the way browsers and Pillow's
/// `ImageOps.exif_transpose` show it; an unreadable tag is no tag.
pub fn decode(bytes: &[u8], exif_orientation: bool) -> Result<DynamicImage, DecodeError> {
    decode_for(bytes, exif_orientation, None)
}

/// As [`decode`], but a JPEG may come out reduced (by 1/2, 1/4 or 1/8, in
/// the DCT domain) as far as it stays at least `wanted` on both sides once
/// turned upright: all a caller that resizes to `wanted` next needs.
pub fn decode_for(
    bytes: &[u8],
    exif_orientation: bool,
    wanted: Option<(u32, u32)>,
) -> Result<DynamicImage, DecodeError> {
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
    // zune-jpeg, the image crate's JPEG decoder, pads missing scan data
    // silently, and the crate (0.25.10) turns its strict mode off. Strict
    // mode would not be enough either: it checks only between rows of blocks,
    // and let a baseline photo missing its last three bytes through.
    let layout = match format {
        ImageFormat::Jpeg => {
            let layout =
                jpeg_layout(bytes).map_err(|detail| DecodeError::Truncated { format: format_name.clone(), detail })?;
            if layout.scans > MAX_JPEG_SCANS {
                return Err(DecodeError::TooManyScans { scans: layout.scans });
            }
            Some(layout)
        }
        _ => None,
    };
    let corrupt = |reason: String| DecodeError::Corrupt { format: format_name.clone(), reason };
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader = reader;
    reader.limits(limits);
    // Read the dimensions first, so the error can name them, and the
    // orientation from the same headers. A JPEG's come from the marker walk:
    // the image crate's decoder would copy the whole file to read them.
    let (width, height, orientation) = match &layout {
        Some(JpegLayout { frame: Some(frame), exif, .. }) => {
            let orientation = exif.and_then(Orientation::from_exif_chunk).unwrap_or(Orientation::NoTransforms);
            (u32::from(frame.width), u32::from(frame.height), orientation)
        }
        _ => {
            let mut header = ImageReader::with_format(Cursor::new(bytes), format)
                .into_decoder()
                .map_err(|e| corrupt(e.to_string()))?;
            let orientation = header.orientation().unwrap_or_else(|e| {
                tracing::debug!("EXIF orientation ignored: {e}");
                Orientation::NoTransforms
            });
            let (width, height) = header.dimensions();
            (width, height, orientation)
        }
    };
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(DecodeError::TooLarge { width, height });
    }
    let orientation = if exif_orientation { orientation } else { Orientation::NoTransforms };
    if let Some(layout) = &layout {
        // The wanted size is the upright picture's; the stored one may be turned.
        let stored = wanted.map(|(w, h)| if turns_sideways(orientation) { (h, w) } else { (w, h) });
        let reduction = super::jpeg::reduction(width, height, stored);
        if let Some(rgb) = super::jpeg::decode(bytes, reduction, layout.scans > 1, MAX_DECODE_BYTES) {
            let mut image = DynamicImage::ImageRgb8(rgb);
            image.apply_orientation(orientation);
            return Ok(image);
        }
    }
    let mut image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => DecodeError::TooLarge { width, height },
        e => corrupt(e.to_string()),
    })?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// About the most decoding `bytes` allocates, from the header: the pixels as
/// decoded and as 8-bit RGB, which also covers the DCT coefficients a JPEG
/// of several scans is held in (at most six bytes a pixel), at most
/// [`MAX_DECODE_BYTES`]; nothing where the header cannot be read, since the
/// decode then fails at once. Callers that decode at once hold a budget of
/// it.
pub fn decode_memory(bytes: &[u8]) -> u64 {
    if let Some(frame) = jpeg_frame(bytes) {
        let pixels = u64::from(frame.width) * u64::from(frame.height);
        // The image crate decodes a JPEG to grey or to RGB.
        let decoded = pixels * if frame.components == 1 { 1 } else { 3 };
        return (decoded + pixels * 3).min(MAX_DECODE_BYTES);
    }
    let Ok(reader) = ImageReader::new(Cursor::new(bytes)).with_guessed_format() else { return 0 };
    let Ok(decoder) = reader.into_decoder() else { return 0 };
    let (width, height) = decoder.dimensions();
    let rgb = u64::from(width) * u64::from(height) * 3;
    decoder.total_bytes().saturating_add(rgb).min(MAX_DECODE_BYTES)
}

/// Whether `orientation` swaps the stored image's width and height.
fn turns_sideways(orientation: Orientation) -> bool {
    use Orientation::*;
    matches!(orientation, Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH)
}

/// What a walk over a JPEG's markers learns on its way to the end.
#[derive(Debug, PartialEq)]
struct JpegLayout<'a> {
    scans: usize,
    /// The first frame header's.
    frame: Option<Frame>,
    /// The last APP1 segment of EXIF data before the first scan, past its
    /// "Exif\0\0", as the image crate's decoder keeps it.
    exif: Option<&'a [u8]>,
}

/// A JPEG frame header's size and component count.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Frame {
    width: u16,
    height: u16,
    components: u8,
}

impl Frame {
    /// From a start-of-frame segment's contents (after the length).
    fn parse(segment: &[u8]) -> Option<Frame> {
        let &[_precision, h1, h0, w1, w0, components, ..] = segment else { return None };
        Some(Frame { width: u16::from_be_bytes([w1, w0]), height: u16::from_be_bytes([h1, h0]), components })
    }
}

/// Whether a marker's code starts a frame: SOF0-3, 5-7, 9-11 and 13-15
/// (0xC4 defines Huffman tables, 0xC8 is reserved, 0xCC is arithmetic
/// coding's conditioning).
fn starts_a_frame(code: u8) -> bool {
    matches!(code, 0xC0..=0xCF) && !matches!(code, 0xC4 | 0xC8 | 0xCC)
}

/// The frame header of a JPEG, from the segments before its first scan, for
/// a size estimate: None if `bytes` is not a JPEG or has no readable frame
/// header there.
fn jpeg_frame(bytes: &[u8]) -> Option<Frame> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return None;
    }
    walk_markers(bytes, false).ok()?.frame
}

/// Where the code of the next marker from `pos` is: past the next 0xFF and
/// any number of 0xFF that pad before the code.
fn next_marker(bytes: &[u8], pos: usize) -> Option<usize> {
    let ff = pos + memchr::memchr(0xFF, bytes.get(pos..)?)?;
    bytes[ff..].iter().position(|&b| b != 0xFF).map(|n| ff + n)
}

/// How many scans a JPEG has, its frame header and EXIF segment, or where it
/// stops short of its end-of-image marker if it does.
///
/// Walks the marker segments by their lengths, so the thumbnail inside an
/// EXIF segment (a whole JPEG with its own end marker) is skipped, and runs
/// through each scan's entropy-coded data to the marker that ends it. Any cut
/// loses the final marker, which is how Pillow and libjpeg see it too: they
/// refuse a file that lacks only those two bytes. Bytes between segments that
/// are not a marker are skipped, as libjpeg does with a warning, so that this
/// rejects nothing but a missing end.
fn jpeg_layout(bytes: &[u8]) -> Result<JpegLayout<'_>, String> {
    walk_markers(bytes, true)
}

/// [`jpeg_layout`]'s walk; without `through_scans`, it stops at the first
/// scan, with what the headers before it hold.
fn walk_markers(bytes: &[u8], through_scans: bool) -> Result<JpegLayout<'_>, String> {
    let len = bytes.len();
    // Past the start-of-image marker, which the format sniffing has seen.
    let mut pos = 2;
    let mut layout = JpegLayout { scans: 0, frame: None, exif: None };
    let stop = |place: &str| Err(format!("it ends after {len} bytes, {place}, without an end-of-image marker"));
    let inside_data =
        |scans: usize| if scans == 0 { "before the compressed pixels" } else { "in the compressed pixels" };
    loop {
        let Some(code_at) = next_marker(bytes, pos) else {
            return stop(inside_data(layout.scans));
        };
        pos = code_at + 1;
        match bytes[code_at] {
            0xD9 => return Ok(layout),
            // A stuffed zero in scan data, a restart marker, or a marker that
            // has no length: nothing to skip.
            0x00 | 0x01 | 0xD0..=0xD8 => {}
            code => {
                let Some(&[high, low]) = bytes.get(pos..pos + 2) else {
                    return stop("in a marker's length");
                };
                let end = pos + usize::from(u16::from_be_bytes([high, low]));
                if end > len {
                    return stop(&format!("in a header segment that runs to byte {end}"));
                }
                let segment = bytes.get(pos + 2..end).unwrap_or_default();
                match code {
                    // A scan's entropy-coded data follows its header unmarked;
                    // the search for the next 0xFF walks through it.
                    0xDA if !through_scans => return Ok(layout),
                    0xDA => layout.scans += 1,
                    code if starts_a_frame(code) && layout.frame.is_none() => layout.frame = Frame::parse(segment),
                    // Only before the first scan, where the image crate's decoder read it.
                    0xE1 if layout.scans == 0 => {
                        if let Some(exif) = segment.strip_prefix(b"Exif\0\0").filter(|exif| !exif.is_empty()) {
                            layout.exif = Some(exif);
                        }
                    }
                    _ => {}
                }
                pos = end;
            }
        }
    }
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
    use super::super::resize;
    use super::super::testing::{encode, fixture, red, shared_jpegs};
    use super::*;
    use image::{GenericImageView, ImageFormat, Rgb, RgbImage};

    #[test]
    fn names_what_is_wrong() {
        assert!(matches!(decode(b"", true), Err(DecodeError::Empty)));
        let html = b"<!DOCTYPE html><html><body>Not found</body></html>";
        assert_eq!(decode(html, true).unwrap_err().to_string(), "not an image (the content is an HTML page)");
        let jpeg = encode(&red(64, 64), ImageFormat::Jpeg);
        let err = decode(&jpeg[..jpeg.len() / 2], true).unwrap_err();
        assert!(err.to_string().starts_with("cannot decode JPEG image: the file is truncated ("), "{err}");
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
        let err = decode(&png, true).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { width: 50_000, height: 50_000 }), "{err}");
        assert_eq!(err.to_string(), "image of 50000x50000 pixels is larger than the limit of 16384x16384");
    }

    /// A baseline JPEG with detail in every block, so each cut loses pixels.
    fn baseline_jpeg() -> Vec<u8> {
        let noisy = RgbImage::from_fn(61, 37, |x, y| Rgb([(x * 4) as u8, (y * 7) as u8, ((x * 31) ^ (y * 17)) as u8]));
        encode(&DynamicImage::ImageRgb8(noisy), ImageFormat::Jpeg)
    }

    fn assert_truncated(bytes: &[u8], what: &str) {
        match decode(bytes, true) {
            Err(err @ DecodeError::Truncated { .. }) => {
                let message = err.to_string();
                assert!(
                    message.starts_with("cannot decode JPEG image: the file is truncated (it ends after "),
                    "{message}"
                );
            }
            other => panic!("{what}: {:?}", other.map(|image| image.dimensions())),
        }
    }

    fn assert_cuts_are_truncated(name: &str, jpeg: &[u8]) {
        decode(jpeg, true).unwrap_or_else(|e| panic!("{name} whole: {e}"));
        for keep in [jpeg.len() / 3, jpeg.len() / 2, jpeg.len() - 5, jpeg.len() - 2] {
            assert_truncated(&jpeg[..keep], &format!("{name} cut to {keep} of {} bytes", jpeg.len()));
        }
    }

    #[test]
    fn cut_jpegs_are_refused_as_truncated() {
        assert_cuts_are_truncated("baseline", &baseline_jpeg());
        assert_cuts_are_truncated("progressive.jpg", &fixture("progressive.jpg"));
        let Some(photos) = shared_jpegs(&["birds/images"]) else { return };
        // owl.jpg is baseline, blue_jay_3.jpg progressive.
        for (name, photo) in
            photos.iter().filter(|(name, _)| name.ends_with("owl.jpg") || name.ends_with("blue_jay_3.jpg"))
        {
            assert_cuts_are_truncated(name, photo);
        }
    }

    #[test]
    fn counts_the_scans_of_a_jpeg() {
        let scans = |jpeg: &[u8]| jpeg_layout(jpeg).map(|layout| layout.scans);
        assert_eq!(scans(&baseline_jpeg()), Ok(1));
        // A baseline file that codes each component in a scan of its own.
        assert_eq!(scans(&fixture("multiscan_baseline.jpg")), Ok(3));
        assert!(scans(&fixture("progressive.jpg")).is_ok_and(|scans| scans > 3));
    }

    /// A JPEG's start, then `scans` scan headers, each with a byte of data.
    fn jpeg_of_scans(scans: usize) -> Vec<u8> {
        let scan = [0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00, 0x2A];
        [&[0xFF, 0xD8][..], &scan.repeat(scans), &[0xFF, 0xD9]].concat()
    }

    #[test]
    fn refuses_a_jpeg_of_too_many_scans_before_decoding_it() {
        let err = decode(&jpeg_of_scans(MAX_JPEG_SCANS + 1), true).unwrap_err();
        assert!(matches!(err, DecodeError::TooManyScans { scans } if scans == MAX_JPEG_SCANS + 1), "{err:?}");
        assert_eq!(err.to_string(), "cannot decode JPEG image: 501 scans, more than the limit of 500");
        // At the limit, the file is the decoders' to judge (this one has no frame).
        let err = decode(&jpeg_of_scans(MAX_JPEG_SCANS), true).unwrap_err();
        assert!(matches!(err, DecodeError::Corrupt { .. }), "{err:?}");
    }

    #[test]
    fn an_end_marker_inside_a_segment_does_not_count() {
        // An EXIF segment carries a thumbnail, a whole JPEG with its own end.
        let thumbnail = encode(&red(8, 8), ImageFormat::Jpeg);
        let photo = baseline_jpeg();
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&u16::try_from(thumbnail.len() + 2).unwrap().to_be_bytes());
        app1.extend_from_slice(&thumbnail);
        let with_thumbnail = [&photo[..2], &app1, &photo[2..]].concat();
        assert_cuts_are_truncated("with a thumbnail", &with_thumbnail);
        // Bytes after the end, as some cameras append, are no cut.
        let trailed = [&photo[..], b"trailing data \xFF\xD8"].concat();
        assert_eq!(decode(&trailed, true).unwrap().dimensions(), (61, 37));
    }

    #[test]
    fn no_prefix_of_a_jpeg_panics_or_decodes() {
        for (name, jpeg) in [("baseline", baseline_jpeg()), ("progressive.jpg", fixture("progressive.jpg"))] {
            for keep in 0..jpeg.len() {
                let prefix = &jpeg[..keep];
                // Shorter than the three bytes the format sniffing reads.
                if keep < 3 {
                    assert!(decode(prefix, true).is_err());
                } else {
                    assert_truncated(prefix, &format!("{name} cut to {keep} bytes"));
                }
                // With an end marker stuck on, the cut reaches the decoder,
                // which may refuse it or fill it in, but must not panic.
                let _ = decode(&[prefix, &[0xFF, 0xD9]].concat(), true);
            }
        }
    }

    /// `jpeg` with an EXIF segment holding only an orientation tag, written
    /// by hand: "Exif", a big-endian TIFF header, one IFD of one entry.
    fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        // Tag 0x0112 (orientation), type SHORT, count 1, the value padded.
        exif.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1]);
        exif.extend_from_slice(&orientation.to_be_bytes());
        exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&u16::try_from(exif.len() + 2).unwrap().to_be_bytes());
        app1.extend_from_slice(&exif);
        [&jpeg[..2], &app1, &jpeg[2..]].concat()
    }

    /// Wider than high: red above green on the left, blue on the right, so
    /// that every flip and turn looks different.
    fn upright() -> RgbImage {
        RgbImage::from_fn(48, 32, |x, y| match (x < 24, y < 16) {
            (true, true) => Rgb([230, 20, 20]),
            (true, false) => Rgb([20, 230, 20]),
            (false, _) => Rgb([20, 20, 230]),
        })
    }

    /// Whether `image` is laid out as `upright`.
    fn looks_upright(image: &DynamicImage) -> bool {
        let rgb = image.to_rgb8();
        let (w, h) = rgb.dimensions();
        let strongest = |x, y| {
            let p = rgb.get_pixel(x, y);
            (0..3).max_by_key(|&c| p[c]).unwrap()
        };
        (w, h) == (48, 32) && strongest(6, 8) == 0 && strongest(6, 24) == 1 && strongest(42, 16) == 2
    }

    #[test]
    fn exif_orientation_turns_the_image_upright() {
        let upright = DynamicImage::ImageRgb8(upright());
        assert!(looks_upright(&decode(&encode(&upright, ImageFormat::Jpeg), true).unwrap()));
        // Each tag with the pixels stored as a camera held that way would
        // store them: turned back, they show the upright picture.
        let stored = [
            (1, upright.clone()),
            (2, upright.fliph()),
            (3, upright.rotate180()),
            (4, upright.flipv()),
            (5, upright.rotate90().fliph()),
            (6, upright.rotate270()),
            (7, upright.rotate270().fliph()),
            (8, upright.rotate90()),
        ];
        for (tag, pixels) in stored {
            let jpeg = with_orientation(&encode(&pixels, ImageFormat::Jpeg), tag);
            let oriented = decode(&jpeg, true).unwrap();
            assert!(looks_upright(&oriented), "orientation {tag}: {:?}", oriented.dimensions());
            // Without it, the pixels as stored.
            let stored = decode(&jpeg, false).unwrap();
            assert_eq!(stored.dimensions(), pixels.dimensions(), "orientation {tag}");
            assert_eq!(looks_upright(&stored), tag == 1, "orientation {tag}");
        }
    }

    #[test]
    fn a_broken_exif_segment_is_no_orientation() {
        let jpeg = encode(&DynamicImage::ImageRgb8(upright()), ImageFormat::Jpeg);
        let mut broken = with_orientation(&jpeg, 6);
        // The TIFF header's byte order, garbled.
        broken[12..14].copy_from_slice(b"XX");
        assert!(looks_upright(&decode(&broken, true).unwrap()));
    }

    /// A smooth JPEG of `width` x `height`, so that any reduction of it
    /// looks like its resize.
    fn smooth_jpeg(width: u32, height: u32) -> Vec<u8> {
        let smooth = RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, ((x + y) * 127 / (width + height)) as u8])
        });
        encode(&DynamicImage::ImageRgb8(smooth), ImageFormat::Jpeg)
    }

    #[test]
    fn a_large_jpeg_is_decoded_reduced_no_smaller_than_wanted() {
        let jpeg = smooth_jpeg(1000, 600);
        // 600 / 4 is short of 224: a half is as far as it goes.
        assert_eq!(decode_for(&jpeg, true, Some((224, 224))).unwrap().dimensions(), (500, 300));
        assert_eq!(decode_for(&jpeg, true, Some((100, 70))).unwrap().dimensions(), (125, 75));
        assert_eq!(decode_for(&jpeg, true, Some((1000, 600))).unwrap().dimensions(), (1000, 600));
        assert_eq!(decode(&jpeg, true).unwrap().dimensions(), (1000, 600));
        // Resized to the model's size, the reduced and the whole photo agree.
        let reduced = resize(decode_for(&jpeg, true, Some((224, 224))).unwrap(), 224, 224).unwrap();
        let whole = resize(decode(&jpeg, true).unwrap(), 224, 224).unwrap();
        let worst = reduced.iter().zip(&whole).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 3, "a channel differs by {worst}");
        let progressive = fixture("progressive.jpg");
        let (width, height) = decode(&progressive, true).unwrap().dimensions();
        let half = decode_for(&progressive, true, Some((width / 2, height / 2))).unwrap();
        assert_eq!(half.dimensions(), (width.div_ceil(2), height.div_ceil(2)));
    }

    #[test]
    fn the_wanted_size_is_the_upright_pictures() {
        // Stored 600 x 1000, shown 1000 x 600 (turned 90 degrees clockwise).
        let stored = image::imageops::rotate270(&RgbImage::from_pixel(1000, 600, Rgb([90, 160, 40])));
        let jpeg = with_orientation(&encode(&DynamicImage::ImageRgb8(stored), ImageFormat::Jpeg), 6);
        // The upright 1000 x 600 halves to 500 x 300 and still covers 400 x 140;
        // the stored 600 x 1000 measured against it would not reduce at all.
        assert_eq!(decode_for(&jpeg, true, Some((400, 140))).unwrap().dimensions(), (500, 300));
        assert_eq!(decode_for(&jpeg, false, Some((400, 140))).unwrap().dimensions(), (600, 1000));
    }

    #[test]
    fn cmyk_jpegs_decode_to_rgb() {
        let rgb = decode(&fixture("cmyk_red.jpg"), true).unwrap().to_rgb8();
        assert_eq!(rgb.dimensions(), (32, 24));
        assert!(rgb.pixels().all(|p| p[0] > 230 && p[1] < 25 && p[2] < 25), "{:?}", rgb.get_pixel(0, 0));
    }

    #[test]
    fn every_shared_photo_is_whole() {
        let Some(photos) = shared_jpegs(&["birds/images", "birds/corpus", "imagenet/images", "models/images"]) else {
            return;
        };
        assert!(photos.len() > 200, "{} JPEGs", photos.len());
        for (name, photo) in &photos {
            let layout = jpeg_layout(photo).unwrap_or_else(|e| panic!("{name}: {e}"));
            // The walk reads the size and orientation the image crate's decoder would.
            let mut header =
                ImageReader::new(Cursor::new(photo)).with_guessed_format().unwrap().into_decoder().unwrap();
            let frame = layout.frame.unwrap_or_else(|| panic!("{name}: no frame"));
            assert_eq!((u32::from(frame.width), u32::from(frame.height)), header.dimensions(), "{name}");
            let orientation = layout.exif.and_then(Orientation::from_exif_chunk).unwrap_or(Orientation::NoTransforms);
            assert_eq!(orientation, header.orientation().unwrap(), "{name}");
            assert_eq!(jpeg_frame(photo), Some(frame), "{name}");
        }
    }

    #[test]
    fn the_frame_header_and_exif_come_from_the_marker_walk() {
        let jpeg = with_orientation(&encode(&DynamicImage::ImageRgb8(upright()), ImageFormat::Jpeg), 6);
        let layout = jpeg_layout(&jpeg).unwrap();
        assert_eq!(layout.frame, Some(Frame { width: 48, height: 32, components: 3 }));
        assert_eq!(layout.exif.and_then(Orientation::from_exif_chunk), Some(Orientation::Rotate90));
        assert_eq!(jpeg_frame(&jpeg), layout.frame);
        // Grey and RGB, decoded by the image crate: 1 or 3 bytes a pixel, and RGB.
        assert_eq!(decode_memory(&jpeg), 48 * 32 * 6);
        let grey = encode(&DynamicImage::ImageLuma8(image::GrayImage::new(40, 10)), ImageFormat::Jpeg);
        assert_eq!(jpeg_frame(&grey), Some(Frame { width: 40, height: 10, components: 1 }));
        assert_eq!(decode_memory(&grey), 40 * 10 * 4);
        // An EXIF segment after the first scan is not the picture's, as the image crate reads it.
        let app1 = &with_orientation(&[0xFF, 0xD8], 6)[2..];
        let plain = encode(&DynamicImage::ImageRgb8(upright()), ImageFormat::Jpeg);
        let late = [&plain[..plain.len() - 2], app1, &plain[plain.len() - 2..]].concat();
        assert_eq!(jpeg_layout(&late).unwrap().exif, None);
        assert!(looks_upright(&decode(&late, true).unwrap()));
        // A frame header cut short is none, and the decoders judge the file.
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        assert_eq!(jpeg_frame(&jpeg[..sof + 6]), None);
        // Not a JPEG.
        assert_eq!(jpeg_frame(b"GIF89a"), None);
    }
}
