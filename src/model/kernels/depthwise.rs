//! A depthwise convolution for channels-last float32 images, with the
//! clamp that follows it (ReLU or ReLU6) done in the same pass.
//!
//! tract 0.23 has vectorised depthwise kernels for ARM and WebAssembly only.
//! On x86-64 its generic loop and the two element-wise passes of the clamp
//! after it took over a third of the birds model's inference time. This op
//! took the model from 21 to 13.4 ms per image (see BENCHMARKS.md).
//!
//! It replaces the depthwise `Conv` nodes of a decluttered graph, before
//! tract's codegen, and leaves every other case to tract.

use std::sync::Arc;

use tract_tflite::internal::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_tflite::internal::tract_core::ops::nn::DataFormat;
use tract_tflite::internal::*;

use super::fusing::{LANES, clamp, constant, fused_clamp, lanes, multiply_add, taps};
use super::grid::{Grid, grid_after, round_all};

/// Vectors summed at once: enough independent sums to keep the
/// multiply-add units busy while loads are in flight.
const GROUP: usize = 4;
/// Output pixels summed at once where they all have every tap.
const PIXELS: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct DepthwiseConv {
    geometry: Geometry,
    /// `[kernel_h][kernel_w][channels]`, as TFLite stores it.
    kernel: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    /// Outputs are clamped to this range; infinite bounds when no clamp was fused.
    low: f32,
    high: f32,
    /// The 8-bit grid the clamped outputs are rounded to, for a quantized
    /// model (see `grid`).
    grid: Option<Grid>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Geometry {
    channels: usize,
    input: (usize, usize),
    output: (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    /// Padding before the first row and column.
    pad: (usize, usize),
}

// tract merges equal ops; weights that hold a NaN only make two equal ops
// look different, which is harmless.
impl Eq for DepthwiseConv {}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        "DepthwiseConvNhwcF32".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}, clamp to [{}, {}], grid {:?}", self.geometry, self.low, self.high, self.grid)])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        // A panic in here is a bug of the tool's: shown, and not blamed on the model.
        crate::model::own_op(&self.name(), || self.eval_images(inputs))
    }
}

impl DepthwiseConv {
    fn eval_images(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let g = &self.geometry;
        let batch = input.shape()[0];
        let shape = [batch, g.output.0, g.output.1, g.channels];
        // SAFETY: `run` writes every channel of every output pixel.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        let src = input.try_as_plain_ram()?;
        let src = src.as_slice::<f32>()?;
        let mut dst = output.try_as_plain_ram_mut()?;
        let dst = dst.as_slice_mut::<f32>()?;
        // What `lanes` relies on.
        ensure!(
            self.kernel.len() == g.kernel.0 * g.kernel.1 * g.channels && self.bias.len() == g.channels,
            "depthwise weights of {} values",
            self.kernel.len()
        );
        ensure!(
            src.len() == batch * g.input.0 * g.input.1 * g.channels,
            "depthwise input of shape {:?}",
            input.shape()
        );
        let per_image_in = g.input.0 * g.input.1 * g.channels;
        let per_image_out = g.output.0 * g.output.1 * g.channels;
        for (src, dst) in src.chunks_exact(per_image_in).zip(dst.chunks_exact_mut(per_image_out)) {
            run(self, src, dst);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for DepthwiseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = &self.geometry;
        let batch = inputs[0].shape[0].clone();
        Ok(tvec!(f32::fact([batch, g.output.0.into(), g.output.1.into(), g.channels.into()])))
    }

    as_op!();
}

/// Runs the op on one image, with the widest vector instructions this CPU has.
fn run(op: &DepthwiseConv, src: &[f32], dst: &mut [f32]) {
    Variant::ALL.iter().copied().find(|v| v.available()).unwrap_or(Variant::Portable).run(op, src, dst)
}

/// The builds of the loops, widest first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Variant {
    const ALL: &[Variant] = &[
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512,
        #[cfg(target_arch = "x86_64")]
        Variant::Avx2,
        Variant::Portable,
    ];

    fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            Variant::Portable => true,
        }
    }

    fn run(self, op: &DepthwiseConv, src: &[f32], dst: &mut [f32]) {
        assert!(self.available(), "{self:?} on a CPU without it");
        match self {
            // SAFETY: the CPU has the features these are compiled for.
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => unsafe { run_avx512(op, src, dst) },
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => unsafe { run_avx2(op, src, dst) },
            // Multiply-add is a base instruction on 64-bit ARM, not on x86-64.
            Variant::Portable => run_portable::<{ cfg!(target_arch = "aarch64") }>(op, src, dst),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn run_avx512(op: &DepthwiseConv, src: &[f32], dst: &mut [f32]) {
    run_portable::<true>(op, src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_avx2(op: &DepthwiseConv, src: &[f32], dst: &mut [f32]) {
    run_portable::<true>(op, src, dst)
}

/// The loops, written for the compiler to vectorise over channels in
/// fixed-size arrays it keeps in registers; `FUSED` says whether
/// multiply-adds are single instructions here (without them `mul_add` is a
/// slow library call).
#[inline(always)]
fn run_portable<const FUSED: bool>(op: &DepthwiseConv, src: &[f32], dst: &mut [f32]) {
    let g = &op.geometry;
    for oy in 0..g.output.0 {
        let ky = g.taps_y(oy);
        let mut ox = 0;
        while ox < g.output.1 {
            // Away from the left and right edges every pixel has all its
            // taps: PIXELS of them share each load of the weights.
            if g.all_taps_across(ox) {
                sum_pixels::<FUSED>(op, src, dst, (oy, ox), ky);
                ox += PIXELS;
            } else {
                sum_pixel::<FUSED>(op, src, dst, (oy, ox), ky, g.taps_x(ox));
                ox += 1;
            }
        }
        // A row at a time, while it is in cache, by a loop of its own:
        // rounding inside the stores cost the multiply-add loops above their
        // vectorisation (the op ran 3 times slower, BENCHMARKS.md).
        if let Some(grid) = op.grid {
            let row = g.output.1 * g.channels;
            round_all(grid, &mut dst[oy * row..][..row]);
        }
    }
}

/// Where the vector reads of a pixel's channels stop, which `lanes` relies
/// on: the end of the last whole group of vectors, then of the last whole
/// vector. The channels past them are read one by one, with checks.
#[inline(always)]
fn vector_ends(channels: usize) -> (usize, usize) {
    (channels - channels % (GROUP * LANES), channels - channels % LANES)
}

impl Geometry {
    fn new(
        padding: &PaddingSpec,
        input: (usize, usize),
        channels: usize,
        kernel: (usize, usize),
        stride: (usize, usize),
    ) -> Geometry {
        let padded = padding.compute(&[input.0, input.1], &[kernel.0, kernel.1], &[1, 1], &[stride.0, stride.1]);
        Geometry {
            channels,
            input,
            output: (padded[0].convoluted, padded[1].convoluted),
            kernel,
            stride,
            pad: (padded[0].pad_before, padded[1].pad_before),
        }
    }

    /// The kernel rows that output row `oy` has inside the input.
    #[inline(always)]
    fn taps_y(&self, oy: usize) -> (usize, usize) {
        taps(oy, self.stride.0, self.pad.0, self.kernel.0, self.input.0)
    }

    /// The kernel columns that output column `ox` has inside the input.
    #[inline(always)]
    fn taps_x(&self, ox: usize) -> (usize, usize) {
        taps(ox, self.stride.1, self.pad.1, self.kernel.1, self.input.1)
    }

    /// Whether output columns `[ox, ox + PIXELS)` all exist and have every
    /// kernel column inside the input, as `sum_pixels` reads them. The
    /// columns a pixel has only shrink towards the edges, so the first and
    /// last pixel stand for those between.
    #[inline(always)]
    fn all_taps_across(&self, ox: usize) -> bool {
        let full = (0, self.kernel.1);
        ox + PIXELS <= self.output.1 && self.taps_x(ox) == full && self.taps_x(ox + PIXELS - 1) == full
    }

    /// Where the input of the pixel `p` columns right of one that reads at
    /// `i` is, for the same tap.
    #[inline(always)]
    fn beside(&self, i: usize, p: usize) -> usize {
        i + p * self.stride.1 * self.channels
    }
}

/// Where tap `(ky, kx)` of output pixel `(oy, ox)` reads: the offsets of
/// its input pixel and of its weights.
#[inline(always)]
fn tap(g: &Geometry, (oy, ox): (usize, usize), ky: usize, kx: usize) -> (usize, usize) {
    let (iy, ix) = (oy * g.stride.0 + ky - g.pad.0, ox * g.stride.1 + kx - g.pad.1);
    ((iy * g.input.1 + ix) * g.channels, (ky * g.kernel.1 + kx) * g.channels)
}

/// `PIXELS` output pixels side by side from `at`, all with every tap across.
#[inline(always)]
fn sum_pixels<const FUSED: bool>(
    op: &DepthwiseConv,
    src: &[f32],
    dst: &mut [f32],
    (oy, ox): (usize, usize),
    ky: (usize, usize),
) {
    let g = &op.geometry;
    let c = g.channels;
    let (kernel, bias) = (op.kernel.as_slice(), op.bias.as_slice());
    let out = &mut dst[(oy * g.output.1 + ox) * c..][..PIXELS * c];
    let (_, vectors) = vector_ends(c);
    let mut c0 = 0;
    while c0 < vectors {
        // SAFETY (here and below): see `lanes`.
        let mut acc = [unsafe { lanes(bias, c0) }; PIXELS];
        for y in ky.0..ky.1 {
            for x in 0..g.kernel.1 {
                let (i, k) = tap(g, (oy, ox), y, x);
                let w = unsafe { lanes(kernel, k + c0) };
                for (p, sums) in acc.iter_mut().enumerate() {
                    let v = unsafe { lanes(src, g.beside(i, p) + c0) };
                    for l in 0..LANES {
                        sums[l] = multiply_add::<FUSED>(v[l], w[l], sums[l]);
                    }
                }
            }
        }
        for (p, sums) in acc.iter().enumerate() {
            for (o, &a) in out[p * c + c0..][..LANES].iter_mut().zip(sums) {
                *o = clamp(a, op.low, op.high);
            }
        }
        c0 += LANES;
    }
    for p in 0..PIXELS {
        remaining_channels::<FUSED>(op, src, &mut out[p * c..][..c], c0, (oy, ox + p), ky, (0, g.kernel.1));
    }
}

/// One output pixel, whose taps are `ky` by `kx`.
#[inline(always)]
fn sum_pixel<const FUSED: bool>(
    op: &DepthwiseConv,
    src: &[f32],
    dst: &mut [f32],
    at: (usize, usize),
    ky: (usize, usize),
    kx: (usize, usize),
) {
    let g = &op.geometry;
    let c = g.channels;
    let out = &mut dst[(at.0 * g.output.1 + at.1) * c..][..c];
    let tap = |y, x| tap(g, at, y, x);
    let (groups, vectors) = vector_ends(c);
    let mut c0 = 0;
    while c0 < groups {
        sum_vectors::<GROUP, FUSED>(op, src, out, c0, ky, kx, &tap);
        c0 += GROUP * LANES;
    }
    while c0 < vectors {
        sum_vectors::<1, FUSED>(op, src, out, c0, ky, kx, &tap);
        c0 += LANES;
    }
    remaining_channels::<FUSED>(op, src, out, c0, at, ky, kx);
}

/// Channels `[c0, channels)` of one output pixel, one by one: those past
/// the last whole vector.
#[inline(always)]
fn remaining_channels<const FUSED: bool>(
    op: &DepthwiseConv,
    src: &[f32],
    out: &mut [f32],
    c0: usize,
    at: (usize, usize),
    ky: (usize, usize),
    kx: (usize, usize),
) {
    let g = &op.geometry;
    for ch in c0..g.channels {
        let mut acc = op.bias[ch];
        for y in ky.0..ky.1 {
            for x in kx.0..kx.1 {
                let (i, k) = tap(g, at, y, x);
                acc = multiply_add::<FUSED>(src[i + ch], op.kernel[k + ch], acc);
            }
        }
        out[ch] = clamp(acc, op.low, op.high);
    }
}

/// Output channels `[c0, c0 + W * LANES)` of one pixel, whose taps are
/// `ky` by `kx` and read where `tap` says.
#[inline(always)]
fn sum_vectors<const W: usize, const FUSED: bool>(
    op: &DepthwiseConv,
    src: &[f32],
    out: &mut [f32],
    c0: usize,
    ky: (usize, usize),
    kx: (usize, usize),
    tap: &impl Fn(usize, usize) -> (usize, usize),
) {
    let (kernel, bias) = (op.kernel.as_slice(), op.bias.as_slice());
    let mut acc = [[0f32; LANES]; W];
    for (v, sums) in acc.iter_mut().enumerate() {
        // SAFETY (here and below): see `lanes`.
        *sums = unsafe { lanes(bias, c0 + v * LANES) };
    }
    for y in ky.0..ky.1 {
        for x in kx.0..kx.1 {
            let (i, k) = tap(y, x);
            for (v, sums) in acc.iter_mut().enumerate() {
                let at = c0 + v * LANES;
                let (x, w) = unsafe { (lanes(src, i + at), lanes(kernel, k + at)) };
                for l in 0..LANES {
                    sums[l] = multiply_add::<FUSED>(x[l], w[l], sums[l]);
                }
            }
        }
    }
    for (v, sums) in acc.iter().enumerate() {
        for (o, &a) in out[c0 + v * LANES..][..LANES].iter_mut().zip(sums) {
            *o = clamp(a, op.low, op.high);
        }
    }
}

/// Replaces each depthwise `Conv` of a decluttered float32 channels-last
/// graph, with the `max` and `min` against constants that follow it, by one
/// [`DepthwiseConv`]. Returns how many it replaced.
pub fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let Some((op, last)) = depthwise_at(model, id)? else { continue };
        let node = model.node(id);
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(model, node.inputs[0])?;
        let wire = patch.wire_node(&node.name, op, &[input])?[0];
        patch.shunt_outside(model, last, wire)?;
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}

/// The op replacing node `id`, and the outlet it replaces (the clamp's, when
/// one follows), if `id` is a depthwise convolution this module can run.
fn depthwise_at(model: &TypedModel, id: usize) -> TractResult<Option<(DepthwiseConv, OutletId)>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    let c = spec.input_channels;
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&d| d == 1));
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OHWI
        || spec.data_format != DataFormat::NHWC
        || conv.group != c
        || spec.output_channels != c
        || spec.kernel_shape.len() != 2
        || !ones(&spec.dilations)
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(&[_, h, w, channels]) = fact.shape.as_concrete() else { return Ok(None) };
    if fact.datum_type != f32::datum_type() || channels != c {
        return Ok(None);
    }
    let (Some(kernel), Some(bias)) = (constant(model, node.inputs[1])?, constant(model, node.inputs[2])?) else {
        return Ok(None);
    };
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    if kernel.shape() != [1, kh, kw, c] || bias.len() != c || bias.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    let strides = spec.strides.clone().unwrap_or_else(|| tvec!(1, 1));
    if matches!(spec.padding, PaddingSpec::ExplicitOnnxPool(..)) {
        return Ok(None);
    }
    let geometry = Geometry::new(&spec.padding, (h, w), c, (kh, kw), (strides[0], strides[1]));
    // Empty tensors are tract's to handle (`eval` cuts images by size).
    if [h, w, c, geometry.output.0, geometry.output.1].contains(&0) {
        return Ok(None);
    }
    let (low, high, last) = fused_clamp(model, OutletId::new(id, 0))?;
    let (grid, last) = grid_after(model, last).map_or((None, last), |(grid, after)| (Some(grid), after));
    let op = DepthwiseConv {
        geometry,
        kernel: Arc::new(kernel.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()),
        bias: Arc::new(bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()),
        low,
        high,
        grid,
    };
    Ok(Some((op, last)))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{
        RELU6, assert_close, assert_on_grid, clamp, conv, conv_op, each_geometry, round_output, run, values,
    };
    use super::*;

    struct Case {
        size: (usize, usize),
        channels: usize,
        kernel: usize,
        stride: usize,
        padding: PaddingSpec,
        clamp: &'static [(&'static str, f32)],
    }

    /// A depthwise convolution as tract-tflite wires one, then the clamp.
    fn graph(case: &Case) -> TypedModel {
        let (h, w) = case.size;
        let c = case.channels;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, h, w, c])).unwrap();
        let op = conv_op(case.kernel, case.stride, case.padding.clone(), (c, c), c);
        let wire = conv(&mut model, "conv", x, op);
        let wire = clamp(&mut model, "conv", wire, case.clamp);
        model.select_output_outlets(&[wire]).unwrap();
        model
    }

    /// Inputs in [-2, 2): enough for sums past the clamps.
    fn input(h: usize, w: usize, c: usize) -> Vec<f32> {
        values(h * w * c, 3, 2.0)
    }

    /// Runs `case` through tract's own depthwise code and through this
    /// module's, and checks they agree.
    fn check(case: Case) {
        let (h, w) = case.size;
        let input = Tensor::from_shape(&[1, h, w, case.channels], &input(h, w, case.channels)).unwrap();
        let mut tract = graph(&case);
        crate::model::declutter().optimize(&mut tract).unwrap();
        let mut ours = tract.clone();
        tract.optimize().unwrap();
        assert_eq!(fuse(&mut ours).unwrap(), 1);
        ours.optimize().unwrap();
        let ops: Vec<String> = ours.nodes().iter().map(|n| n.op.name().to_string()).collect();
        assert!(ops.contains(&"DepthwiseConvNhwcF32".to_string()), "{ops:?}");
        // A fused clamp leaves no min or max behind.
        assert_eq!(ops.iter().filter(|o| o.contains("Max") || o.contains("Min")).count(), 0, "{ops:?}");
        let op = ours.nodes().iter().find_map(|n| n.op_as::<DepthwiseConv>()).unwrap().clone();
        let (expected, got) = (run(tract, &input), run(ours, &input));
        assert_eq!(expected.shape(), got.shape());
        let (expected, got) =
            (expected.to_plain_array_view::<f32>().unwrap(), got.to_plain_array_view::<f32>().unwrap());
        let expected = expected.as_slice().unwrap();
        assert_close(expected, got.as_slice().unwrap(), "depthwise");

        // Each build of the loops on its own, not only the one this CPU picks.
        let src = input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        for &variant in Variant::ALL {
            if !variant.available() {
                println!("{variant:?} skipped: this CPU lacks it");
                continue;
            }
            let mut dst = vec![f32::NAN; expected.len()];
            variant.run(&op, &src, &mut dst);
            assert_close(expected, &dst, &format!("{variant:?}"));
        }
    }

    /// As `check`, with the clamped output rounded to a quantized model's
    /// ReLU6 grid: tract's convolution then the tool's own rounding (which
    /// its tests check against the formula), against the rounding fused.
    fn check_with_grid(case: Case) {
        let (h, w) = case.size;
        let input = Tensor::from_shape(&[1, h, w, case.channels], &input(h, w, case.channels)).unwrap();
        let grid = Grid::new(6.0 / 255.0, 0, 0, 255).unwrap();
        let mut tract = graph(&case);
        round_output(&mut tract, grid);
        crate::model::declutter().optimize(&mut tract).unwrap();
        let mut ours = tract.clone();
        tract.optimize().unwrap();
        assert_eq!(fuse(&mut ours).unwrap(), 1);
        ours.optimize().unwrap();
        let ops: Vec<String> = ours.nodes().iter().map(|n| n.op.name().to_string()).collect();
        assert!(!ops.iter().any(|o| o.contains("RoundToGrid")), "{ops:?}");
        let op = ours.nodes().iter().find_map(|n| n.op_as::<DepthwiseConv>()).unwrap().clone();
        assert_eq!(op.grid, Some(grid));
        let expected = run(tract, &input);
        let expected = expected.to_plain_array_view::<f32>().unwrap();
        let expected = expected.as_slice().unwrap();
        let got = run(ours, &input);
        assert_on_grid(expected, got.to_plain_array_view::<f32>().unwrap().as_slice().unwrap(), grid.step(), "plan");
        let src = input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        for &variant in Variant::ALL {
            if !variant.available() {
                println!("{variant:?} skipped: this CPU lacks it");
                continue;
            }
            let mut dst = vec![f32::NAN; expected.len()];
            variant.run(&op, &src, &mut dst);
            assert_on_grid(expected, &dst, grid.step(), &format!("{variant:?}"));
        }
    }

    #[test]
    fn a_quantized_models_rounding_is_fused_into_the_stores() {
        // Whole vectors of pixels, single pixels at the edges, and channels
        // past the last whole vector: each store.
        check_with_grid(Case {
            size: (7, 9),
            channels: 96,
            kernel: 3,
            stride: 1,
            padding: PaddingSpec::SameUpper,
            clamp: RELU6,
        });
        check_with_grid(Case {
            size: (11, 10),
            channels: 23,
            kernel: 3,
            stride: 2,
            padding: PaddingSpec::SameUpper,
            clamp: RELU6,
        });
        check_with_grid(Case {
            size: (5, 6),
            channels: 3,
            kernel: 3,
            stride: 1,
            padding: PaddingSpec::Valid,
            clamp: &[],
        });
    }

    /// The geometries the op meets (see `each_geometry`).
    fn geometries(channels: &[usize]) -> Vec<Geometry> {
        each_geometry(channels, |padding, size, c, kernel, stride| {
            let g = Geometry::new(padding, size, c, kernel, stride);
            // As `depthwise_at`, which leaves empty outputs to tract.
            (g.output.0 > 0 && g.output.1 > 0).then_some(g)
        })
    }

    #[test]
    fn vector_reads_stop_within_the_channels() {
        for c in 0..200 {
            let (groups, vectors) = vector_ends(c);
            assert!(groups <= vectors && vectors <= c, "{c}: {groups} {vectors}");
            assert_eq!((groups % (GROUP * LANES), vectors % LANES), (0, 0), "{c}");
            // The channels read one by one are fewer than a vector's.
            assert!(c - vectors < LANES && vectors - groups < GROUP * LANES, "{c}: {groups} {vectors}");
        }
    }

    #[test]
    fn every_vector_read_is_inside_its_slice() {
        for g in geometries(&[1, 16, 23, 71]) {
            let c = g.channels;
            let (src, kernel) = (g.input.0 * g.input.1 * c, g.kernel.0 * g.kernel.1 * c);
            let (_, vectors) = vector_ends(c);
            let read = |(i, k): (usize, usize), what: &str| {
                for c0 in (0..vectors).step_by(LANES) {
                    assert!(i + c0 + LANES <= src && k + c0 + LANES <= kernel, "{what} at {i}, {k}, {c0} of {g:?}");
                }
                // The channels past the vectors, read with checks, are in
                // the same pixel: any other is a wrong read.
                assert!(i + c <= src && k + c <= kernel, "{what} at {i}, {k} of {g:?}");
            };
            for oy in 0..g.output.0 {
                let ky = g.taps_y(oy);
                for ox in 0..g.output.1 {
                    let kx = g.taps_x(ox);
                    for (y, x) in (ky.0..ky.1).flat_map(|y| (kx.0..kx.1).map(move |x| (y, x))) {
                        read(tap(&g, (oy, ox), y, x), "one pixel");
                    }
                    if !g.all_taps_across(ox) {
                        continue;
                    }
                    for p in 0..PIXELS {
                        // Each pixel of a block reads its own input, at every tap across.
                        assert_eq!(g.taps_x(ox + p), (0, g.kernel.1), "{ox} + {p} of {g:?}");
                        for (y, x) in (ky.0..ky.1).flat_map(|y| (0..g.kernel.1).map(move |x| (y, x))) {
                            let (i, k) = tap(&g, (oy, ox), y, x);
                            assert_eq!(g.beside(i, p), tap(&g, (oy, ox + p), y, x).0, "{ox} + {p} of {g:?}");
                            read((g.beside(i, p), k), "a block");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_panic_in_the_op_is_the_tools_own_and_shown() {
        let case =
            Case { size: (4, 4), channels: 16, kernel: 3, stride: 1, padding: PaddingSpec::SameUpper, clamp: RELU6 };
        let mut model = graph(&case);
        crate::model::declutter().optimize(&mut model).unwrap();
        assert_eq!(fuse(&mut model).unwrap(), 1);
        let plan = model.into_runnable().unwrap();
        let input = Tensor::from_shape(&[1, 4, 4, 16], &input(4, 4, 16)).unwrap();
        let (outcome, quiet) = crate::model::tests::with_panic_in("DepthwiseConvNhwcF32", || {
            crate::model::guarded(|| plan.run(tvec!(input.into())))
        });
        let error = outcome.unwrap_err();
        assert!(
            matches!(&error, crate::model::ModelError::Internal { op, .. } if op == "DepthwiseConvNhwcF32"),
            "{error:?}"
        );
        assert_eq!(quiet, Some(false), "the panic hook would have hidden it");
    }

    #[test]
    fn agrees_with_tract_stride_one_same_padding() {
        check(Case { size: (7, 9), channels: 96, kernel: 3, stride: 1, padding: PaddingSpec::SameUpper, clamp: RELU6 });
    }

    #[test]
    fn agrees_with_tract_stride_two_on_odd_and_even_sizes() {
        for size in [(8, 8), (11, 10)] {
            check(Case { size, channels: 144, kernel: 3, stride: 2, padding: PaddingSpec::SameUpper, clamp: RELU6 });
        }
    }

    #[test]
    fn agrees_with_tract_on_channels_past_whole_vectors() {
        // 16 + 7 channels: one vector, then single channels.
        check(Case { size: (5, 6), channels: 23, kernel: 3, stride: 1, padding: PaddingSpec::SameUpper, clamp: RELU6 });
        check(Case { size: (5, 6), channels: 3, kernel: 3, stride: 2, padding: PaddingSpec::SameUpper, clamp: &[] });
    }

    #[test]
    fn agrees_with_tract_on_other_kernels_and_paddings() {
        let relu = &[("Max", 0.0)];
        check(Case { size: (9, 9), channels: 32, kernel: 5, stride: 2, padding: PaddingSpec::SameUpper, clamp: relu });
        check(Case { size: (9, 7), channels: 64, kernel: 3, stride: 1, padding: PaddingSpec::Valid, clamp: RELU6 });
        let explicit = PaddingSpec::Explicit(tvec!(2, 0), tvec!(0, 1));
        check(Case { size: (6, 6), channels: 16, kernel: 3, stride: 1, padding: explicit, clamp: RELU6 });
    }

    #[test]
    fn a_conv_read_elsewhere_keeps_its_own_output() {
        // The convolution's output is the model's output too: the clamp
        // cannot be fused into it, the convolution alone is.
        let case =
            Case { size: (4, 4), channels: 16, kernel: 3, stride: 1, padding: PaddingSpec::SameUpper, clamp: RELU6 };
        let mut model = graph(&case);
        let conv = model.node_by_name("conv").unwrap().id;
        let clamped = model.output_outlets().unwrap()[0];
        model.select_output_outlets(&[OutletId::new(conv, 0), clamped]).unwrap();
        crate::model::declutter().optimize(&mut model).unwrap();
        assert_eq!(fuse(&mut model).unwrap(), 1);
        let ops: Vec<String> = model.nodes().iter().map(|n| n.op.name().to_string()).collect();
        assert!(ops.iter().any(|o| o.contains("Max")), "{ops:?}");
    }

    #[test]
    fn a_nan_passes_through_and_inputs_smaller_than_the_kernel_are_left_to_tract() {
        let case =
            Case { size: (4, 4), channels: 16, kernel: 3, stride: 1, padding: PaddingSpec::SameUpper, clamp: &[] };
        let mut model = graph(&case);
        crate::model::declutter().optimize(&mut model).unwrap();
        assert_eq!(fuse(&mut model).unwrap(), 1);
        let mut image = input(4, 4, 16);
        image[0] = f32::NAN;
        let out = run(model, &Tensor::from_shape(&[1, 4, 4, 16], &image).unwrap());
        assert!(out.to_plain_array_view::<f32>().unwrap()[[0, 0, 0, 0]].is_nan());

        let tiny = Case { size: (2, 2), channels: 16, kernel: 3, stride: 1, padding: PaddingSpec::Valid, clamp: RELU6 };
        let mut model = graph(&tiny);
        crate::model::declutter().optimize(&mut model).unwrap();
        assert_eq!(fuse(&mut model).unwrap(), 0);
    }

    #[test]
    fn kernels_computed_at_run_time_are_left_to_tract() {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 5, 5, 16])).unwrap();
        let kernel = model.add_source("kernel", f32::fact([1, 3, 3, 16])).unwrap();
        let bias = model.add_const("bias", Tensor::from_shape(&[16], &values(16, 2, 1.0)).unwrap()).unwrap();
        let op = conv_op(3, 1, PaddingSpec::SameUpper, (16, 16), 16);
        let y = model.wire_node("conv", op, &[x, kernel, bias]).unwrap();
        model.select_output_outlets(&y).unwrap();
        assert_eq!(fuse(&mut model).unwrap(), 0);
    }
}
