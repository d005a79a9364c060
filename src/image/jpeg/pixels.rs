//! A progressive JPEG's coefficients to RGB by libjpeg-turbo (pixels.c),
//! which makes them the pixels a whole decode by libjpeg-turbo gives.

use std::ffi::{c_char, c_int, c_uint, c_ulong};

use super::progressive::Coefficients;

/// The planes as pixels.c reads them (its `struct planes`).
#[repr(C)]
struct Planes {
    blocks: [*const i16; 4],
    blocks_per_row: [usize; 4],
    rows: [usize; 4],
    components: c_int,
}

unsafe extern "C" {
    fn classifier_pixels_from_coefficients(
        header: *const u8,
        header_length: c_ulong,
        planes: *const Planes,
        scale_denom: c_uint,
        pixels: *mut u8,
        width: usize,
        height: usize,
        message: *mut c_char,
        message_length: usize,
    ) -> c_int;
}

/// `coefficients` as RGB at 1/`reduction` of the size (1, 2, 4 or 8):
/// the width, height and pixels.
pub fn rgb(coefficients: &Coefficients, reduction: usize) -> Result<(usize, usize, Vec<u8>), String> {
    if coefficients.planes.len() > 4 || ![1, 2, 4, 8].contains(&reduction) {
        return Err("not a plane count or reduction libjpeg takes".into());
    }
    let mut planes = Planes {
        blocks: [std::ptr::null(); 4],
        blocks_per_row: [0; 4],
        rows: [0; 4],
        components: coefficients.planes.len() as c_int,
    };
    for (i, plane) in coefficients.planes.iter().enumerate() {
        // pixels.c reads block (row, column) only for row < rows and
        // column < blocks_per_row: inside the plane's blocks.
        if plane.blocks.len() != plane.blocks_per_row * plane.rows {
            return Err("a plane of the wrong size".into());
        }
        planes.blocks[i] = plane.blocks.as_ptr().cast();
        planes.blocks_per_row[i] = plane.blocks_per_row;
        planes.rows[i] = plane.rows;
    }
    // libjpeg rounds a reduced side up (jdmaster.c, jpeg_core_output_dimensions).
    let (width, height) = (coefficients.width.div_ceil(reduction), coefficients.height.div_ceil(reduction));
    let length = width * height * 3;
    // Not zeroed first: libjpeg writes every byte, and zeroing a photo's
    // worth of memory took 1.6% of a corpus run's CPU.
    let mut pixels = Vec::<u8>::with_capacity(length);
    let mut message = [0 as c_char; 200];
    // SAFETY: the header and planes outlive the call; pixels.c writes at
    // most width * height * 3 bytes from `pixels`' pointer, inside its
    // capacity (it checks libjpeg's output size against width and height
    // first), and at most `message.len()` bytes of `message`; it reads
    // blocks only within each plane's rows and blocks_per_row, checked above
    // against the plane's length.
    let status = unsafe {
        classifier_pixels_from_coefficients(
            coefficients.header.as_ptr(),
            coefficients.header.len() as c_ulong,
            &planes,
            reduction as c_uint,
            pixels.as_mut_ptr(),
            width,
            height,
            message.as_mut_ptr(),
            message.len(),
        )
    };
    if status != 0 {
        let bytes: Vec<u8> = message.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        return Err(format!("libjpeg-turbo: {}", String::from_utf8_lossy(&bytes)));
    }
    // SAFETY: status 0 means pixels.c read all `height` rows out of
    // libjpeg, each `width * 3` bytes written in full: `length` bytes.
    unsafe { pixels.set_len(length) };
    Ok((width, height, pixels))
}
