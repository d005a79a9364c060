//! The tool's own convolution ops, put in tract's graph in place of its
//! own: the only `unsafe` arithmetic of the project.

pub mod dense;
pub mod depthwise;
mod fusing;
pub mod grid;
pub mod integer;
#[cfg(test)]
mod testing;
