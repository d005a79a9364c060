//! What the tests of the tool's own convolutions share: reproducible
//! values, and convolutions and clamps wired as tract-tflite wires them.

use tract_tflite::internal::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
use tract_tflite::internal::tract_core::ops::math;
use tract_tflite::internal::tract_core::ops::nn::DataFormat;
use tract_tflite::internal::*;

pub const RELU6: &[(&str, f32)] = &[("Max", 0.0), ("Min", 6.0)];

/// `n` values in [-scale, scale), the same on every run.
pub fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            ((state >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A channels-last float32 convolution of `group` groups (1, or the input
/// channels for a depthwise one), as tract-tflite builds it.
pub fn conv_op(kernel: usize, stride: usize, padding: PaddingSpec, (cin, cout): (usize, usize), group: usize) -> Conv {
    Conv {
        pool_spec: PoolSpec {
            data_format: DataFormat::NHWC,
            kernel_shape: tvec!(kernel, kernel),
            padding,
            dilations: Some(tvec!(1, 1)),
            strides: Some(tvec!(stride, stride)),
            input_channels: cin,
            output_channels: cout,
        },
        kernel_fmt: KernelFormat::OHWI,
        group,
        q_params: None,
    }
}

/// Wires `conv` after `x`, with constant weights and bias in [-1, 1).
pub fn conv(model: &mut TypedModel, name: &str, x: OutletId, conv: Conv) -> OutletId {
    let spec = &conv.pool_spec;
    let (k, cin, cout) = (spec.kernel_shape[0], spec.input_channels, spec.output_channels);
    let shape = if conv.group == 1 { [cout, k, k, cin] } else { [1, k, k, cin] };
    let kernel = Tensor::from_shape(&shape, &values(shape.iter().product(), 1, 1.0)).unwrap();
    let kernel = model.add_const(format!("{name}.kernel"), kernel).unwrap();
    let bias = Tensor::from_shape(&[cout], &values(cout, 2, 1.0)).unwrap();
    let bias = model.add_const(format!("{name}.bias"), bias).unwrap();
    model.wire_node(name, conv, &[x, kernel, bias]).unwrap()[0]
}

/// Wires a `max` and/or `min` against constants after `wire`, as `clamp` lists them.
pub fn clamp(model: &mut TypedModel, name: &str, mut wire: OutletId, clamp: &[(&str, f32)]) -> OutletId {
    for (op, bound) in clamp {
        let bound = model.add_const(format!("{name}.{op}.bound"), tensor4(&[[[[*bound]]]])).unwrap();
        let math = if *op == "Max" { math::max() } else { math::min() };
        wire = model.wire_node(format!("{name}.{op}"), math, &[wire, bound]).unwrap()[0];
    }
    wire
}

/// Wires the rounding to `grid` after the model's output, which it becomes.
pub fn round_output(model: &mut TypedModel, grid: super::grid::Grid) {
    let output = model.output_outlets().unwrap()[0];
    let rounded = model.wire_node("rounded", super::grid::RoundToGrid(grid), &[output]).unwrap()[0];
    model.select_output_outlets(&[rounded]).unwrap();
}

/// Checks that `got` is `expected` but for float rounding, where both are
/// rounded to a grid of `step`: a sum a rounding error away from the middle
/// of two steps may round the other way, which only a few may do.
pub fn assert_on_grid(expected: &[f32], got: &[f32], step: f32, what: &str) {
    assert_eq!(expected.len(), got.len(), "{what}");
    let mut moved = 0;
    for (i, (e, g)) in expected.iter().zip(got).enumerate() {
        let d = (e - g).abs();
        if d <= 1e-5 * (1.0 + e.abs()) {
            continue;
        }
        assert!((d - step).abs() <= 1e-5 * (1.0 + e.abs()), "{what}, at {i}: tract {e}, ours {g}");
        moved += 1;
    }
    assert!(moved * 200 <= expected.len(), "{what}: {moved} of {} values a step away", expected.len());
}

/// The first output of `model` on `input`.
pub fn run(model: TypedModel, input: &Tensor) -> Tensor {
    let plan = model.into_runnable().unwrap();
    plan.run(tvec!(input.clone().into())).unwrap().remove(0).into_tensor()
}

/// Checks that `got` is `expected` but for float rounding.
pub fn assert_close(expected: &[f32], got: &[f32], what: &str) {
    assert_eq!(expected.len(), got.len(), "{what}");
    for (i, (e, g)) in expected.iter().zip(got).enumerate() {
        assert!((e - g).abs() <= 1e-4 * (1.0 + e.abs()), "{what}, at {i}: tract {e}, ours {g}");
    }
}

/// What the ops' geometries are built from, over the cases they meet: sizes
/// odd and even, some smaller than the kernel or than a block of pixels,
/// both strides, each padding. `make` builds one, or refuses it (as the
/// ops leave empty outputs to tract).
pub fn each_geometry<C: Copy, G>(
    channels: &[C],
    make: impl Fn(&PaddingSpec, (usize, usize), C, (usize, usize), (usize, usize)) -> Option<G>,
) -> Vec<G> {
    let paddings = [PaddingSpec::SameUpper, PaddingSpec::Valid, PaddingSpec::Explicit(tvec!(2, 0), tvec!(0, 1))];
    let mut all = vec![];
    for h in 1..=9 {
        for w in 1..=9 {
            for &c in channels {
                for (k, s) in [(1, 1), (1, 2), (3, 1), (3, 2), (5, 1), (5, 2)] {
                    for padding in &paddings {
                        all.extend(make(padding, (h, w), c, (k, k), (s, s)));
                    }
                }
            }
        }
    }
    all
}
