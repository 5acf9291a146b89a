// moec prelude: helpers shared by every generated kernel. The generator prepends the constants
// (shapes, grid folding GX/GY) and the storage bindings `b0..bN`; templates only use those names.

const FLT_MAX: f32 = 3.40282347e38;

// tanh saturates to ±1 in f32 beyond |x| = 15; clamping keeps exp-based implementations from
// overflowing to NaN on some drivers.
fn tanh_(x: f32) -> f32 {
    return tanh(clamp(x, -15.0, 15.0));
}

fn sigmoid_(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

fn silu_(x: f32) -> f32 {
    return x / (1.0 + exp(-x));
}

// GPT-2 / HF `gelu_new` (tanh approximation).
fn gelu_(x: f32) -> f32 {
    return 0.5 * x * (1.0 + tanh_(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

// d/dx of gelu_ (same tanh approximation): the backward of Gelu.
fn gelu_grad_(x: f32) -> f32 {
    let c = 0.7978845608028654;
    let t = tanh_(c * (x + 0.044715 * x * x * x));
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 0.134145 * x * x);
}

// ln(1 + e^x) without overflow.
fn softplus_(x: f32) -> f32 {
    return max(x, 0.0) + log(1.0 + exp(-abs(x)));
}

// Φ(x), the standard normal CDF, via erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7).
fn normal_cdf_(x: f32) -> f32 {
    let z = abs(x) * 0.7071067811865476;
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * exp(-z * z);
    return 0.5 * (1.0 + sign(x) * erf);
}

// φ(x) = e^(−x²/2)/√(2π).
fn normal_pdf_(x: f32) -> f32 {
    return 0.3989422804014327 * exp(-0.5 * x * x);
}
