//! A quantized network run in 8-bit integers, as the runtime its authors
//! calibrated it for runs it: every activation is a byte on its tensor's
//! grid, every product an integer, and each op's sums come back to bytes as
//! LiteRT brings them, to the bit: XNNPACK's "fp32 requantization" (one
//! float multiplication rounded half to even) for convolutions and MEAN,
//! its fixed-point adder for sums, TFLite's own kernels for the average
//! pool and the softmax, which XNNPACK does not take quantized.
//!
//! Bytes are a quarter of float32's memory traffic, and the products run on
//! the CPU's 8-bit dot-product instructions where it has them
//! (`kernels::integer`). `tflite::integer` plans a network from a file; a
//! graph with anything this module lacks is left to the float rebuild.
//!
//! int8 tensors are held as bytes too, shifted up by 128 with their zero
//! point: every kernel then reads unsigned activations, and an int8 model's
//! QUANTIZE from its uint8 input is a relabelling, not a pass.

use super::kernels::integer::{Depthwise, Gemm, Geometry};

/// Where an activation is kept, and how its bytes read as real values:
/// `real = (byte - zero) * scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activation {
    pub slot: usize,
    pub scale: f32,
    pub zero: i32,
}

/// The im2col copy of a convolution's input: for each output pixel, the
/// input pixels under its kernel, channels last, taps outside the image at
/// the zero point, so that a convolution becomes one matrix product.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Im2col {
    pub geometry: Geometry,
    pub zero: u8,
}

impl Im2col {
    /// The bytes of one output pixel's row.
    pub fn depth(&self) -> usize {
        let g = &self.geometry;
        g.kernel.0 * g.kernel.1 * g.channels
    }

    /// Each row of a window is one copy of the input columns inside it, between
    /// zero points: a copy a tap was a call to `memcpy` for the three bytes
    /// of the first convolution's pixels, a tenth of the network's time.
    ///
    /// The windows are written one after another, each row of each window
    /// starting where the last ended, so that a row of up to 16 bytes may be
    /// copied as 16: what it writes past its end, the next row overwrites. The
    /// first convolution of an RGB image copies 9-byte rows, and the windows'
    /// bookkeeping and exact copies made this copy half its time.
    fn run(&self, input: &[u8], out: &mut [u8]) {
        let g = &self.geometry;
        let (c, depth) = (g.channels, self.depth());
        let span = g.kernel.1 * c;
        let row_bytes = g.input.1 * c;
        let out = &mut out[..g.output.0 * g.output.1 * depth];
        // Each output column's input columns, and where they start in its window's row.
        let columns: Vec<_> = (0..g.output.1)
            .map(|ox| {
                let columns = window(ox, g.stride.1, g.pad.1, g.kernel.1, g.input.1);
                let left = (columns.start + g.pad.1).saturating_sub(ox * g.stride.1).min(g.kernel.1);
                (columns.start * c, left * c..(left + columns.len()) * c)
            })
            .collect();
        let mut at = 0;
        for oy in 0..g.output.0 {
            let rows = window(oy, g.stride.0, g.pad.0, g.kernel.0, g.input.0);
            let whole_rows = rows.len() == g.kernel.0;
            for (from, inside) in &columns {
                let first = rows.start * row_bytes + from;
                // The common case, wholly inside the image, without the per-row checks below.
                if whole_rows
                    && inside.len() == span
                    && span <= 16
                    && first + (g.kernel.0 - 1) * row_bytes + 16 <= input.len()
                    && at + depth - span + 16 <= out.len()
                {
                    for ky in 0..g.kernel.0 {
                        out[at + ky * span..][..16].copy_from_slice(&input[first + ky * row_bytes..][..16]);
                    }
                    at += depth;
                    continue;
                }
                for ky in 0..g.kernel.0 {
                    let iy = (oy * g.stride.0 + ky).checked_sub(g.pad.0).filter(|iy| rows.contains(iy));
                    let taps = at..at + span;
                    at += span;
                    let Some(iy) = iy else {
                        out[taps].fill(self.zero);
                        continue;
                    };
                    let source = &input[iy * row_bytes + from..];
                    let taps = &mut out[taps];
                    taps[..inside.start].fill(self.zero);
                    copy_short(&mut taps[inside.clone()], &source[..inside.len()]);
                    taps[inside.end..].fill(self.zero);
                }
            }
        }
    }
}

/// `src` into `dst`, of the same length: a window's row is a few bytes (9
/// for the first convolution of an RGB image), for which a call to `memcpy`
/// costs more than the copy; up to 32 bytes, two overlapping fixed-size
/// moves do it.
#[inline(always)]
fn copy_short(dst: &mut [u8], src: &[u8]) {
    let n = dst.len();
    assert_eq!(n, src.len());
    match n {
        16..=32 => {
            dst[..16].copy_from_slice(&src[..16]);
            dst[n - 16..].copy_from_slice(&src[n - 16..]);
        }
        8..=15 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

/// How a step's real results become output bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub zero: i32,
    pub low: u8,
    pub high: u8,
}

impl Bounds {
    /// `scaled`, a real value over the output's scale, as the output byte:
    /// rounded half to even, shifted by the zero point, clamped.
    #[inline(always)]
    fn byte(&self, scaled: f32) -> u8 {
        // Adding 1.5 * 2^23 leaves no bits below the units, so the addition
        // rounds half to even as the CPU's default mode does, in plain SSE2
        // arithmetic: `round_ties_even` is a libm call per value there. The
        // clamp first keeps the value well inside the trick's range, and is
        // exact, its bounds being integers; a NaN clamps to NaN, which
        // converts to 0.
        const MAGIC: f32 = 12_582_912.0;
        let low = (self.low as i32 - self.zero) as f32;
        let high = (self.high as i32 - self.zero) as f32;
        let clamped = if scaled < low {
            low
        } else if scaled > high {
            high
        } else {
            scaled
        };
        (((clamped + MAGIC) - MAGIC) as i32 + self.zero) as u8
    }
}

/// XNNPACK's addition of two quantized activations (its `qu8`/`qs8` vadd):
/// each byte times an integer multiplier of at most 21 bits, summed with a
/// bias that carries the zero points and the rounding, and shifted back, so
/// that a sum is rounded half up, as the runtime rounds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Addition {
    a_multiplier: i32,
    b_multiplier: i32,
    bias: i32,
    shift: u32,
}

impl Addition {
    /// The sum of `a` and `b` on the grid of scale `output_scale`, or None
    /// where the ratios of the scales are out of the range XNNPACK takes
    /// (2^-10 to 2^8).
    pub fn new(a: Activation, b: Activation, output_scale: f32) -> Option<Addition> {
        let (a_ratio, b_ratio) = (a.scale / output_scale, b.scale / output_scale);
        let range = 2f32.powi(-10)..2f32.powi(8);
        if !(range.contains(&a_ratio) && range.contains(&b_ratio)) {
            return None;
        }
        let exponent = (a_ratio.max(b_ratio).to_bits() >> 23) as i32 - 127;
        // In [12, 30]: the larger multiplier has 21 bits.
        let shift = (20 - exponent) as u32;
        // Exact: a power of two only moves the exponent.
        let multiplier = |ratio: f32| (ratio * 2f32.powi(shift as i32)).round_ties_even() as i32;
        let (a_multiplier, b_multiplier) = (multiplier(a_ratio), multiplier(b_ratio));
        let bias = (1 << (shift - 1)) - a_multiplier * a.zero - b_multiplier * b.zero;
        Some(Addition { a_multiplier, b_multiplier, bias, shift })
    }

    /// The output byte of `x + y`. No sum overflows: the multipliers are at
    /// most 2^21 and the bytes and zero points at most 255.
    #[inline(always)]
    fn byte(&self, x: u8, y: u8, bounds: &Bounds) -> u8 {
        let sum = self.bias + x as i32 * self.a_multiplier + y as i32 * self.b_multiplier;
        ((sum >> self.shift) + bounds.zero).clamp(bounds.low as i32, bounds.high as i32) as u8
    }

    /// `out[i]` = the byte of `x[i] + y[i]`, compiled for AVX2 where the CPU
    /// has it: the products are 32-bit, which SSE2 multiplies two lanes at a
    /// time, and the residual sums were a tenth of the steps between the
    /// convolutions (`Session::classify` in a profile).
    fn bytes(&self, x: &[u8], y: &[u8], out: &mut [u8], bounds: &Bounds) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the one feature `bytes_avx2` is compiled for.
            return unsafe { self.bytes_avx2(x, y, out, bounds) };
        }
        self.bytes_plain(x, y, out, bounds);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn bytes_avx2(&self, x: &[u8], y: &[u8], out: &mut [u8], bounds: &Bounds) {
        self.bytes_plain(x, y, out, bounds);
    }

    #[inline(always)]
    fn bytes_plain(&self, x: &[u8], y: &[u8], out: &mut [u8], bounds: &Bounds) {
        assert_eq!((x.len(), y.len()), (out.len(), out.len()));
        for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
            *o = self.byte(x, y, bounds);
        }
    }
}

/// One operation of the network, reading and writing activation slots.
#[derive(Debug)]
pub enum Step {
    /// A 1x1 convolution or a fully connected layer: `pixels` rows.
    Product {
        input: usize,
        output: usize,
        pixels: usize,
        gemm: Gemm,
    },
    /// Any other dense convolution, through an im2col copy.
    Convolution {
        input: usize,
        output: usize,
        im2col: Im2col,
        gemm: Gemm,
    },
    Depthwise {
        input: usize,
        output: usize,
        conv: Depthwise,
    },
    /// The sum of two activations of one shape.
    Add {
        a: usize,
        b: usize,
        output: usize,
        sum: Addition,
        bounds: Bounds,
    },
    /// An average over windows (the geometry's kernel) of each channel, as
    /// AVERAGE_POOL_2D and MEAN compute it: only the taps inside the image
    /// count.
    Pool {
        input: Activation,
        output: usize,
        pool: Geometry,
        rounding: Averaging,
        bounds: Bounds,
    },
    /// Softmax over rows of `width` values, as TFLite's own kernel computes
    /// it (XNNPACK takes no quantized softmax): `exponent` is beta times the
    /// input's scale; an unsigned output rounds half up, a signed one half
    /// away from zero.
    Softmax {
        input: usize,
        output: usize,
        width: usize,
        exponent: f32,
        output_scale: f32,
        unsigned: bool,
        bounds: Bounds,
    },
    /// The same real values on another grid.
    Requantize {
        input: Activation,
        output: usize,
        scale: f32,
        bounds: Bounds,
    },
}

impl Step {
    /// The slots the step reads, and the one it writes.
    fn slots(&self) -> (Vec<usize>, usize) {
        match self {
            Step::Product { input, output, .. }
            | Step::Convolution { input, output, .. }
            | Step::Depthwise { input, output, .. }
            | Step::Softmax { input, output, .. } => (vec![*input], *output),
            Step::Pool { input, output, .. } | Step::Requantize { input, output, .. } => (vec![input.slot], *output),
            Step::Add { a, b, output, .. } => (vec![*a, *b], *output),
        }
    }
}

/// A planned integer network: its steps over slots, one a tensor, and the
/// buffers that hold the slots.
#[derive(Debug)]
pub struct Network {
    pub steps: Vec<Step>,
    /// Where the image goes, one byte per value of `[1, H, W, 3]`, and the
    /// byte each pixel value of each of the image's channels (R, G, B)
    /// becomes, normalized as that channel is.
    pub input: usize,
    pub pixel_bytes: Box<[[u8; 256]; 3]>,
    /// Whether each of `pixel_bytes` maps a value to itself (a uint8 model
    /// that reads pixels as they are), so that the image is copied as it is.
    pixels_are_bytes: bool,
    /// The image's height and width.
    pub size: (usize, usize),
    pub output: Activation,
    pub output_shape: Vec<usize>,
    /// The largest im2col copy, kept by each session.
    pub scratch: usize,
    layout: Layout,
}

/// Which buffer holds each slot. A slot's buffer is free again once its
/// last reader has run, so a network of sixty tensors needs a handful of
/// buffers, which stay in the CPU's caches from one step to the next.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    /// The bytes of each slot.
    sizes: Vec<usize>,
    /// The buffer of each slot.
    buffer: Vec<usize>,
    /// The bytes of each buffer.
    buffers: Vec<usize>,
}

impl Layout {
    /// Buffers for `sizes.len()` slots written and read by `steps` in
    /// order, `input` written before the first and `output` read after the
    /// last. A step's output never shares a buffer with its inputs, nor
    /// with any slot still to be read.
    fn new(steps: &[Step], sizes: Vec<usize>, input: usize, output: usize) -> Layout {
        let slots = sizes.len();
        let mut last_read = vec![None; slots];
        for (k, step) in steps.iter().enumerate() {
            for read in step.slots().0 {
                last_read[read] = Some(k);
            }
        }
        last_read[output] = Some(usize::MAX);
        let mut buffer = vec![usize::MAX; slots];
        let mut buffers: Vec<usize> = vec![];
        let mut free: Vec<usize> = vec![];
        let take = |slot: usize, buffer: &mut Vec<usize>, buffers: &mut Vec<usize>, free: &mut Vec<usize>| {
            // The smallest free buffer that holds it, else the largest grown.
            let fits =
                free.iter().enumerate().filter(|(_, b)| buffers[**b] >= sizes[slot]).min_by_key(|(_, b)| buffers[**b]);
            let pick = fits.map(|(k, _)| k).or_else(|| (0..free.len()).max_by_key(|&k| buffers[free[k]]));
            let chosen = match pick {
                Some(k) => free.swap_remove(k),
                None => {
                    buffers.push(0);
                    buffers.len() - 1
                }
            };
            buffers[chosen] = buffers[chosen].max(sizes[slot]);
            buffer[slot] = chosen;
        };
        take(input, &mut buffer, &mut buffers, &mut free);
        // A slot read but never written (a malformed graph) keeps a buffer of its own.
        let written: Vec<usize> = steps.iter().map(|step| step.slots().1).collect();
        for slot in 0..slots {
            if slot != input && !written.contains(&slot) {
                take(slot, &mut buffer, &mut buffers, &mut free);
            }
        }
        for (k, step) in steps.iter().enumerate() {
            let (reads, write) = step.slots();
            if buffer[write] == usize::MAX {
                take(write, &mut buffer, &mut buffers, &mut free);
            }
            for read in reads.into_iter().chain([write]) {
                if last_read[read].is_none_or(|last| last <= k) && !free.contains(&buffer[read]) {
                    free.push(buffer[read]);
                }
            }
        }
        Layout { sizes, buffer, buffers }
    }
}

impl Network {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        steps: Vec<Step>,
        sizes: Vec<usize>,
        input: usize,
        pixel_bytes: Box<[[u8; 256]; 3]>,
        size: (usize, usize),
        output: Activation,
        output_shape: Vec<usize>,
        scratch: usize,
    ) -> Network {
        let layout = Layout::new(&steps, sizes, input, output.slot);
        let pixels_are_bytes =
            pixel_bytes.iter().all(|bytes| bytes.iter().enumerate().all(|(v, &b)| usize::from(b) == v));
        Network { steps, input, pixel_bytes, pixels_are_bytes, size, output, output_shape, scratch, layout }
    }

    /// The bytes a session holds.
    pub fn session_bytes(&self) -> usize {
        self.layout.buffers.iter().sum::<usize>() + self.scratch
    }

    pub fn session(&self) -> Session {
        let buffers = self.layout.buffers.iter().map(|&size| vec![0; size]).collect();
        Session { buffers, scratch: vec![0; self.scratch] }
    }

    /// Scores of one image of 8-bit RGB pixels, `[H, W, 3]` row by row,
    /// the model's channel `c` reading the image's channel `order[c]`.
    pub fn classify(&self, session: &mut Session, image: &[u8], order: [usize; 3]) -> Vec<f32> {
        let mut slots = Slots { buffers: &mut session.buffers, layout: &self.layout };
        let input = slots.write(self.input);
        if order == [0, 1, 2] && self.pixels_are_bytes {
            input.copy_from_slice(image);
        } else {
            for (value, pixel) in input.chunks_exact_mut(3).zip(image.chunks_exact(3)) {
                for (value, &c) in value.iter_mut().zip(&order) {
                    *value = self.pixel_bytes[c][pixel[c] as usize];
                }
            }
        }
        for step in &self.steps {
            run(step, &mut slots, &mut session.scratch);
        }
        let Activation { slot, scale, zero } = self.output;
        slots.read(slot).iter().map(|&q| (q as i32 - zero) as f32 * scale).collect()
    }
}

/// One worker's buffers for a [`Network`].
#[derive(Debug)]
pub struct Session {
    buffers: Vec<Vec<u8>>,
    scratch: Vec<u8>,
}

/// A session's buffers seen as the network's slots.
struct Slots<'a> {
    buffers: &'a mut [Vec<u8>],
    layout: &'a Layout,
}

impl Slots<'_> {
    fn read(&self, slot: usize) -> &[u8] {
        &self.buffers[self.layout.buffer[slot]][..self.layout.sizes[slot]]
    }

    fn write(&mut self, slot: usize) -> &mut [u8] {
        &mut self.buffers[self.layout.buffer[slot]][..self.layout.sizes[slot]]
    }

    /// Slot `read` to read and slot `write` to write, in different buffers.
    fn pair(&mut self, read: usize, write: usize) -> (&[u8], &mut [u8]) {
        let (r, w) = (self.layout.buffer[read], self.layout.buffer[write]);
        let (read_len, write_len) = (self.layout.sizes[read], self.layout.sizes[write]);
        assert_ne!(r, w, "a step reads the buffer it writes");
        let (input, output) = if r < w {
            let (low, high) = self.buffers.split_at_mut(w);
            (&low[r], &mut high[0])
        } else {
            let (low, high) = self.buffers.split_at_mut(r);
            (&high[0], &mut low[w])
        };
        (&input[..read_len], &mut output[..write_len])
    }
}

fn run(step: &Step, slots: &mut Slots, scratch: &mut [u8]) {
    match step {
        Step::Product { input, output, pixels, gemm } => {
            let (input, output) = slots.pair(*input, *output);
            gemm.run(input, *pixels, output);
        }
        Step::Convolution { input, output, im2col, gemm } => {
            let pixels = im2col.geometry.output.0 * im2col.geometry.output.1;
            let rows = &mut scratch[..pixels * im2col.depth()];
            im2col.run(slots.read(*input), rows);
            gemm.run(rows, pixels, slots.write(*output));
        }
        Step::Depthwise { input, output, conv } => {
            let (input, output) = slots.pair(*input, *output);
            conv.run(input, output);
        }
        Step::Add { a, b, output, sum, bounds } => {
            // The output's buffer is taken out for the step: it is neither input's.
            let buffer = slots.layout.buffer[*output];
            let mut out = std::mem::take(&mut slots.buffers[buffer]);
            let (x, y) = (slots.read(*a), slots.read(*b));
            assert_eq!((x.len(), y.len()), (slots.layout.sizes[*output], slots.layout.sizes[*output]));
            sum.bytes(x, y, &mut out[..x.len()], bounds);
            slots.buffers[buffer] = out;
        }
        Step::Pool { input: from, output, pool, rounding, bounds } => {
            let zero = from.zero;
            let (input, output) = slots.pair(from.slot, *output);
            average(pool, input, output, zero, *rounding, bounds);
        }
        Step::Softmax { input, output, width, exponent, output_scale, unsigned, bounds } => {
            let (input, output) = slots.pair(*input, *output);
            let mut e = vec![0f32; *width];
            for (row, out) in input.chunks_exact(*width).zip(output.chunks_exact_mut(*width)) {
                let max = row.iter().copied().max().unwrap_or(0);
                let mut sum = 0f32;
                for (e, &q) in e.iter_mut().zip(row) {
                    *e = ((q as i32 - max as i32) as f32 * exponent).exp();
                    sum += *e;
                }
                let inverse = 1.0 / (sum * output_scale);
                for (o, &e) in out.iter_mut().zip(&e) {
                    let p = e * inverse;
                    let q = if *unsigned { (p + 0.5) as i32 } else { p.round() as i32 };
                    *o = (q + bounds.zero).clamp(bounds.low as i32, bounds.high as i32) as u8;
                }
            }
        }
        Step::Requantize { input, output, scale, bounds } => {
            let zero = input.zero;
            let (input, output) = slots.pair(input.slot, *output);
            for (o, &q) in output.iter_mut().zip(input) {
                *o = bounds.byte((q as i32 - zero) as f32 * scale);
            }
        }
    }
}

/// How an average is rounded to a byte.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Averaging {
    /// As XNNPACK's MEAN: the sum less the zero points, times the input's
    /// scale over the output's and over the count, in that order, rounded
    /// half to even.
    Scaled { from: f32, to: f32 },
    /// As TFLite's own AVERAGE_POOL_2D (XNNPACK takes no quantized one),
    /// the output on the input's grid: the sum of the values as stored
    /// (`signed`: int8, held shifted by 128) divided by the count, rounded
    /// half away from zero.
    Divided { signed: bool },
}

/// Each output value: the average of the taps inside the image, rounded as
/// `rounding` says; `zero` is the input's zero point.
fn average(pool: &Geometry, input: &[u8], output: &mut [u8], zero: i32, rounding: Averaging, bounds: &Bounds) {
    let c = pool.channels;
    // In i64: a window of more than 2^23 bytes would overflow i32.
    let mut sums = vec![0i64; c];
    let mut outs = output.chunks_exact_mut(c);
    for oy in 0..pool.output.0 {
        for ox in 0..pool.output.1 {
            let Some(out) = outs.next() else { return };
            sums.fill(0);
            let mut count = 0;
            let rows = window(oy, pool.stride.0, pool.pad.0, pool.kernel.0, pool.input.0);
            let columns = window(ox, pool.stride.1, pool.pad.1, pool.kernel.1, pool.input.1);
            for iy in rows {
                for ix in columns.clone() {
                    let at = (iy * pool.input.1 + ix) * c;
                    for (sum, &q) in sums.iter_mut().zip(&input[at..at + c]) {
                        *sum += i64::from(q);
                    }
                    count += 1i64;
                }
            }
            let count = count.max(1);
            match rounding {
                Averaging::Scaled { from, to } => {
                    let per_tap = from / (to * count as f32);
                    for (o, &sum) in out.iter_mut().zip(&sums) {
                        *o = bounds.byte((sum - count * i64::from(zero)) as f32 * per_tap);
                    }
                }
                Averaging::Divided { signed } => {
                    let shift = if signed { 128 } else { 0 };
                    for (o, &sum) in out.iter_mut().zip(&sums) {
                        // C's division truncates toward zero, as Rust's does.
                        let stored = sum - count * shift;
                        let half = if stored > 0 { count / 2 } else { -(count / 2) };
                        let average = (stored + half) / count + shift;
                        *o = average.clamp(i64::from(bounds.low), i64::from(bounds.high)) as u8;
                    }
                }
            }
        }
    }
}

/// The input positions of window `o` along one axis that are inside it.
fn window(o: usize, stride: usize, pad: usize, size: usize, input: usize) -> std::ops::Range<usize> {
    let start = o * stride;
    start.saturating_sub(pad).min(input)..(start + size).saturating_sub(pad).min(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(input: usize, output: usize) -> Step {
        let bounds = Bounds { zero: 0, low: 0, high: 255 };
        Step::Requantize { input: Activation { slot: input, scale: 1.0, zero: 0 }, output, scale: 1.0, bounds }
    }

    fn add(a: usize, b: usize, output: usize) -> Step {
        let one = Activation { slot: 0, scale: 1.0, zero: 0 };
        let sum = Addition::new(one, one, 1.0).unwrap();
        Step::Add { a, b, output, sum, bounds: Bounds { zero: 0, low: 0, high: 255 } }
    }

    #[test]
    fn sums_round_half_up_as_xnnpack_does() {
        let grid = |scale, zero| Activation { slot: 0, scale, zero };
        let bounds = Bounds { zero: 10, low: 0, high: 255 };
        // Halves of the output's steps: 3 + 2 = 5 halves, 2.5 rounds up to 3.
        let sum = Addition::new(grid(0.5, 0), grid(0.5, 0), 1.0).unwrap();
        assert_eq!(sum.byte(3, 2, &bounds), 13);
        assert_eq!(sum.byte(3, 0, &bounds), 12);
        // Zero points, and a negative half rounding up: -1.5 to -1.
        let sum = Addition::new(grid(0.5, 100), grid(0.5, 100), 1.0).unwrap();
        assert_eq!(sum.byte(98, 99, &bounds), 9);
        assert_eq!(sum.byte(255, 255, &bounds), 165);
        // Scales whose ratio XNNPACK refuses.
        assert!(Addition::new(grid(1.0, 0), grid(1e-4, 0), 1.0).is_none());
        assert!(Addition::new(grid(300.0, 0), grid(1.0, 0), 1.0).is_none());
    }

    #[test]
    fn whole_rows_of_sums_match_the_sum_of_each_pair() {
        let grid = |scale, zero| Activation { slot: 0, scale, zero };
        let sum = Addition::new(grid(0.043, 131), grid(0.0171, 7), 0.05).unwrap();
        let bounds = Bounds { zero: 117, low: 3, high: 250 };
        // Every pair of bytes, in a row long enough for the vector loop and
        // with a tail, against the sum byte by byte.
        let (x, y): (Vec<u8>, Vec<u8>) = (0..=255u8).flat_map(|x| (0..=255u8).map(move |y| (x, y))).unzip();
        let (x, y) = (&x[..x.len() - 5], &y[..y.len() - 5]);
        let mut out = vec![0; x.len()];
        sum.bytes(x, y, &mut out, &bounds);
        let expected: Vec<u8> = x.iter().zip(y).map(|(&x, &y)| sum.byte(x, y, &bounds)).collect();
        assert!(out == expected, "the row differs from the bytes one by one");
        assert!(out.contains(&3) && out.contains(&250), "the clamps were not reached");
    }

    /// Runs `steps` over `layout` on paper: each slot a step reads must
    /// still be in its buffer, every buffer must hold the slots put in it.
    fn check(steps: &[Step], layout: &Layout, input: usize, output: usize) {
        let mut holds: Vec<Option<usize>> = vec![None; layout.buffers.len()];
        let written: Vec<usize> = steps.iter().map(|step| step.slots().1).collect();
        for slot in (0..layout.sizes.len()).filter(|slot| slot == &input || !written.contains(slot)) {
            assert_eq!(holds[layout.buffer[slot]], None, "slots {slot} and another start in one buffer");
            holds[layout.buffer[slot]] = Some(slot);
        }
        for (k, step) in steps.iter().enumerate() {
            let (reads, write) = step.slots();
            for &read in &reads {
                assert_eq!(holds[layout.buffer[read]], Some(read), "step {k} reads slot {read}, overwritten");
                assert_ne!(layout.buffer[read], layout.buffer[write], "step {k} writes a buffer it reads");
            }
            assert!(layout.buffers[layout.buffer[write]] >= layout.sizes[write]);
            holds[layout.buffer[write]] = Some(write);
        }
        assert_eq!(holds[layout.buffer[output]], Some(output));
    }

    #[test]
    fn buffers_are_shared_once_their_slots_are_read() {
        // A chain: two buffers, each as large as the largest slot it holds.
        let steps = [copy(0, 1), copy(1, 2), copy(2, 3), copy(3, 4)];
        let layout = Layout::new(&steps, vec![10, 20, 30, 5, 7], 0, 4);
        check(&steps, &layout, 0, 4);
        assert_eq!(layout.buffers.len(), 2);
        assert_eq!(layout.buffers.iter().sum::<usize>(), 50);
        // A residual block: slot 1 stays until the sum reads it.
        let steps = [copy(0, 1), copy(1, 2), copy(2, 3), add(1, 3, 4), copy(4, 5)];
        let layout = Layout::new(&steps, vec![8; 6], 0, 5);
        check(&steps, &layout, 0, 5);
        assert_eq!(layout.buffers.len(), 3);
        // The input is read late, and a slot nobody writes keeps its own.
        let steps = [copy(0, 1), copy(1, 2), add(0, 2, 3), add(3, 6, 4), copy(4, 5)];
        let layout = Layout::new(&steps, vec![4, 5, 6, 7, 8, 9, 10], 0, 5);
        check(&steps, &layout, 0, 5);
    }

    #[test]
    fn buffers_hold_every_live_slot_in_networks_of_skips() {
        // Chains with sums reaching back up to four steps, in every pattern
        // a small counter gives.
        for pattern in 0u32..2000 {
            let mut steps = vec![copy(0, 1)];
            for k in 2..12 {
                let back = ((pattern >> (k % 8)) % 5) as usize;
                match back {
                    0 | 1 => steps.push(copy(k - 1, k)),
                    back => steps.push(add(k - 1, k.saturating_sub(back), k)),
                }
            }
            let sizes = (0..12).map(|k| 1 + (pattern as usize * 7 + k * 13) % 17).collect();
            let layout = Layout::new(&steps, sizes, 0, 11);
            check(&steps, &layout, 0, 11);
        }
    }

    #[test]
    fn a_window_keeps_to_the_image() {
        assert_eq!(window(0, 2, 1, 3, 5), 0..2);
        assert_eq!(window(1, 2, 1, 3, 5), 1..4);
        assert_eq!(window(2, 2, 1, 3, 5), 3..5);
        assert_eq!(window(0, 1, 0, 7, 7), 0..7);
        assert_eq!(window(9, 1, 0, 3, 5), 5..5);
    }

    #[test]
    fn im2col_puts_the_zero_point_outside_the_image() {
        // A 2x2 image of one channel, a 3x3 kernel, SAME padding.
        let geometry =
            Geometry { input: (2, 2), channels: 1, output: (2, 2), kernel: (3, 3), stride: (1, 1), pad: (1, 1) };
        let im2col = Im2col { geometry, zero: 9 };
        let mut out = vec![0; 4 * 9];
        im2col.run(&[1, 2, 3, 4], &mut out);
        assert_eq!(&out[..9], &[9, 9, 9, 9, 1, 2, 9, 3, 4]);
        assert_eq!(&out[27..], &[1, 2, 9, 3, 4, 9, 9, 9, 9]);
    }

    #[test]
    fn im2col_copies_each_tap_as_the_window_places_it() {
        // Against a tap-by-tap copy, over strides, paddings, kernels larger
        // than the image, and window rows of 1 to 45 bytes (each of the
        // short copy's cases).
        let mut rng = crate::model::kernels::integer::testing::Rng(0x5eed_1234_abcd_0001);
        for _ in 0..2000 {
            let (h, w, c) = (1 + rng.below(6), 1 + rng.below(6), 1 + rng.below(9));
            let (kh, kw) = (1 + rng.below(5), 1 + rng.below(5));
            let (sy, sx) = (1 + rng.below(3), 1 + rng.below(3));
            // Paddings past the kernel too, which no planned geometry has.
            let (py, px) = (rng.below(kh + 3), rng.below(kw + 3));
            let output = ((h + 2 * py).saturating_sub(kh) / sy + 1, (w + 2 * px).saturating_sub(kw) / sx + 1);
            let geometry =
                Geometry { input: (h, w), channels: c, output, kernel: (kh, kw), stride: (sy, sx), pad: (py, px) };
            let im2col = Im2col { geometry, zero: 7 };
            let input: Vec<u8> = (0..h * w * c).map(|_| rng.byte()).collect();
            let mut out = vec![0; output.0 * output.1 * im2col.depth()];
            im2col.run(&input, &mut out);
            let mut expected = Vec::new();
            for oy in 0..output.0 {
                for ox in 0..output.1 {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * sy + ky).checked_sub(py).filter(|&y| y < h);
                            let ix = (ox * sx + kx).checked_sub(px).filter(|&x| x < w);
                            match iy.zip(ix) {
                                Some((iy, ix)) => expected.extend(&input[(iy * w + ix) * c..][..c]),
                                None => expected.extend(std::iter::repeat_n(7, c)),
                            }
                        }
                    }
                }
            }
            assert_eq!(out, expected, "{geometry:?}");
        }
    }

    #[test]
    fn im2col_of_images_wide_enough_for_whole_16_byte_copies() {
        // As the first convolution of an RGB image: rows of 9 bytes, copied
        // 16 at a time inside the image; and rows of 12 and 16 bytes.
        let mut rng = crate::model::kernels::integer::testing::Rng(0x5eed_1234_abcd_0002);
        for (c, kernel, stride, pad) in [(3, 3, 2, 1), (3, 3, 2, 0), (3, 3, 1, 1), (4, 3, 1, 1), (8, 2, 2, 0)] {
            for side in [5, 11, 24] {
                let output = (side + 2 * pad - kernel) / stride + 1;
                let geometry = Geometry {
                    input: (side, side),
                    channels: c,
                    output: (output, output),
                    kernel: (kernel, kernel),
                    stride: (stride, stride),
                    pad: (pad, pad),
                };
                let im2col = Im2col { geometry, zero: 200 };
                let input: Vec<u8> = (0..side * side * c).map(|_| rng.byte()).collect();
                // Slack past the copy, as the session's scratch has, which must stay as it was.
                let mut out = vec![1; output * output * im2col.depth() + 64];
                im2col.run(&input, &mut out);
                for (i, taps) in out.chunks_exact(im2col.depth()).take(output * output).enumerate() {
                    let (oy, ox) = (i / output, i % output);
                    for (t, tap) in taps.chunks_exact(c).enumerate() {
                        let (ky, kx) = (t / kernel, t % kernel);
                        let iy = (oy * stride + ky).checked_sub(pad).filter(|&y| y < side);
                        let ix = (ox * stride + kx).checked_sub(pad).filter(|&x| x < side);
                        let expected = match iy.zip(ix) {
                            Some((iy, ix)) => &input[(iy * side + ix) * c..][..c],
                            None => &[200; 8][..c],
                        };
                        assert_eq!(tap, expected, "{geometry:?}: window {i}, tap {t}");
                    }
                }
                assert!(out[output * output * im2col.depth()..].iter().all(|&b| b == 1), "{geometry:?}");
            }
        }
    }

    #[test]
    fn average_pooling_counts_only_the_taps_inside() {
        let pool = Geometry { input: (2, 2), channels: 1, output: (2, 2), kernel: (2, 2), stride: (1, 1), pad: (0, 0) };
        let bounds = Bounds { zero: 0, low: 0, high: 255 };
        let mut out = [0; 4];
        let scaled = Averaging::Scaled { from: 1.0, to: 1.0 };
        average(&pool, &[10, 20, 30, 41], &mut out, 0, scaled, &bounds);
        // (10+20+30+41)/4 = 25.25; the last column and row average fewer
        // taps: (20+41)/2 = 30.5 rounds to even, (30+41)/2 = 35.5 too.
        assert_eq!(out, [25, 30, 36, 41]);
        // TFLite's own kernel rounds half up, and half away from zero on int8.
        average(&pool, &[10, 20, 30, 41], &mut out, 0, Averaging::Divided { signed: false }, &bounds);
        assert_eq!(out, [25, 31, 36, 41]);
        // int8 values -118, -108, -98, -87, held as 10, 20, 30, 41:
        // -102.75, -97.5 away from zero to -98, -92.5 to -93, -87.
        average(&pool, &[10, 20, 30, 41], &mut out, 128, Averaging::Divided { signed: true }, &bounds);
        assert_eq!(out, [25, 30, 35, 41]);
        // Zero points: input 10 reads as 0, the output's zero is 100.
        let bounds = Bounds { zero: 100, low: 0, high: 255 };
        average(&pool, &[10, 10, 10, 10], &mut out, 10, scaled, &bounds);
        assert_eq!(out, [100; 4]);
    }

    #[test]
    fn bytes_round_to_nearest_even_and_clamp() {
        let bounds = Bounds { zero: 10, low: 5, high: 20 };
        let bytes = [0.5, 1.5, 2.5, -0.5, -1.5, 4.5, 100.0, -100.0, f32::NAN, f32::INFINITY].map(|x| bounds.byte(x));
        assert_eq!(bytes, [10, 12, 12, 10, 8, 14, 20, 5, 10, 20]);
    }
}
