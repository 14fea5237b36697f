//! The one-token decode step of a single sequence on the CPU in fp32, with
//! the small operations in plain Rust.
//!
//! Decoding one token of a 135M model is 211 matrix-vector products that
//! stream every weight once (bound by memory bandwidth) and, around them,
//! ~50 tiny operations per layer on 576-wide vectors: RMSNorm, RoPE, the KV
//! cache append, attention over the cached positions, SiLU, residual adds.
//! Through libtorch each tiny operation costs a dispatch, an allocation and,
//! for reductions and attention, a wake-up of the thread pool; measured in
//! context (`docs/BENCHMARKS.md`, Model: generation) an RMSNorm cost 27 µs
//! and an attention 48 µs, a fifth of the step. Here the projections stay in
//! libtorch ([`Linear::forward`], so biases and LoRA adapters apply exactly
//! as in the graph path) and everything between them runs on `Vec<f32>`:
//! the residual stream, a KV cache laid out `[kv_head][position][head_dim]`
//! per layer, RoPE from the model's own frequencies, grouped-query attention
//! with the sliding window, and the SwiGLU gate.
//!
//! It computes what [`LlamaModel::forward`] computes for one new token of a
//! batch of one with no padding, to float rounding (tested against it on
//! every architecture fixture); [`FastDecoder::supports`] says when it
//! applies. [`crate::generate`] switches to it after the prompt's prefill.

use crate::error::{EngineError, Result};
use crate::model::{KvCache, LlamaModel};
use crate::nn::Linear;
use tch::{Device, Kind, Tensor};

#[cfg(test)]
thread_local! {
    /// Fast steps taken on this thread (tests check that `generate` uses them).
    pub(crate) static STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Per-layer weights needed outside libtorch.
#[derive(Debug)]
struct LayerNorms {
    input: Vec<f32>,
    post_attention: Vec<f32>,
}

/// Incremental decoder for one sequence: a Rust-side KV cache and the
/// per-token step (see the module documentation).
#[derive(Debug)]
pub struct FastDecoder<'m> {
    model: &'m LlamaModel,
    norms: Vec<LayerNorms>,
    final_norm: Vec<f32>,
    inv_freq: Vec<f32>,
    /// Per layer, `[kv_heads][capacity][head_dim]`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    window: Option<usize>,
    // Scratch buffers, reused across steps.
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    Ok(Vec::<f32>::try_from(t.view([-1]))?)
}

impl<'m> FastDecoder<'m> {
    /// Whether the fast step applies to `model`: fp32 weights on the CPU.
    /// (The caller also needs a batch of one without padding.)
    pub fn supports(model: &LlamaModel) -> bool {
        model.kind() == Kind::Float && model.device() == Device::Cpu
    }

    /// Takes over a one-sequence `cache` filled by a graph forward (the
    /// prompt's prefill); `capacity` is the longest sequence expected (the
    /// cache grows past it if needed).
    pub fn from_cache(model: &'m LlamaModel, cache: &KvCache, capacity: usize) -> Result<Self> {
        if !Self::supports(model) {
            return Err(EngineError::invalid(
                "model",
                "the fast decode step needs fp32 weights on the CPU",
            ));
        }
        let c = &model.config;
        let (hidden, heads, kv_heads, head_dim) =
            (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let len = usize::try_from(cache.len()).unwrap_or(0);
        let capacity = capacity.max(len + 1);
        let mut keys = Vec::with_capacity(model.layers.len());
        let mut values = Vec::with_capacity(model.layers.len());
        for l in 0..model.layers.len() {
            let (k, v) = cache.layer(l);
            if k.size().first() != Some(&1) {
                return Err(EngineError::invalid(
                    "cache",
                    "the fast decode step takes a cache of one sequence",
                ));
            }
            keys.push(Self::transfer(&k, kv_heads, len, capacity, head_dim)?);
            values.push(Self::transfer(&v, kv_heads, len, capacity, head_dim)?);
        }
        let norms = model
            .layers
            .iter()
            .map(|layer| {
                Ok(LayerNorms {
                    input: to_vec(&layer.input_layernorm.weight)?,
                    post_attention: to_vec(&layer.post_attention_layernorm.weight)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            norms,
            final_norm: to_vec(&model.norm.weight)?,
            inv_freq: to_vec(model.inv_freq())?,
            keys,
            values,
            len,
            capacity,
            hidden,
            heads,
            kv_heads,
            head_dim,
            eps: c.rms_norm_eps as f32,
            window: c.sliding_window,
            x: vec![0.0; hidden],
            h: vec![0.0; hidden],
            q: vec![0.0; heads * head_dim],
            k: vec![0.0; kv_heads * head_dim],
            v: vec![0.0; kv_heads * head_dim],
            attn: vec![0.0; heads * head_dim],
            gate: vec![0.0; c.intermediate_size],
            up: vec![0.0; c.intermediate_size],
            scores: Vec::with_capacity(capacity),
            cos: vec![0.0; head_dim],
            sin: vec![0.0; head_dim],
        })
    }

    /// The first `len` positions of a `[1, kv_heads, cap, head_dim]` cache
    /// tensor, laid out `[kv_heads][capacity][head_dim]`.
    fn transfer(
        t: &Tensor,
        kv_heads: usize,
        len: usize,
        capacity: usize,
        head_dim: usize,
    ) -> Result<Vec<f32>> {
        if len == 0 {
            return Ok(vec![0.0f32; kv_heads * capacity * head_dim]);
        }
        let used = t.narrow(2, 0, len as i64).contiguous();
        let flat = Vec::<f32>::try_from(used.view([-1]))?;
        Ok(relayout(&flat, kv_heads, head_dim, len, len, capacity))
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before any position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn grow(&mut self) {
        let new_cap = (self.capacity * 2).max(self.len + 1);
        let (kvh, d, old, len) = (self.kv_heads, self.head_dim, self.capacity, self.len);
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *buf = relayout(buf, kvh, d, len, old, new_cap);
        }
        self.capacity = new_cap;
    }

    /// Feeds `token` at the next position and returns the logits `[1, vocab]`
    /// (fp32) for the position after it.
    pub fn step(&mut self, token: i64) -> Result<Tensor> {
        let vocab = self.model.config.vocab_size as i64;
        if !(0..vocab).contains(&token) {
            return Err(EngineError::invalid(
                "token",
                format!("token id {token} is outside the vocabulary (0..{vocab})"),
            ));
        }
        if self.len == self.capacity {
            self.grow();
        }
        let _guard = tch::no_grad_guard();
        let model = self.model;
        let row = model.embed_tokens.weight.get(token).to_kind(Kind::Float);
        row.copy_data(&mut self.x, self.hidden);
        self.rope_tables();
        for l in 0..model.layers.len() {
            self.layer(l)?;
        }
        self.len += 1;
        #[cfg(test)]
        STEPS.with(|c| c.set(c.get() + 1));
        rms_norm(&self.x, &self.final_norm, self.eps, &mut self.h);
        let h = Tensor::from_slice(&self.h).view([1, self.hidden as i64]);
        Ok(model.lm_head.forward(&h))
    }

    /// `cos` and `sin` of the current position, in the layout of the graph
    /// path (`cat(f, f)` over the head dimension).
    fn rope_tables(&mut self) {
        let half = self.head_dim / 2;
        // The graph path multiplies in fp32 (position as f32 × inv_freq).
        let pos = self.len as f32;
        for (i, &f) in self.inv_freq.iter().enumerate().take(half) {
            let angle = pos * f;
            let (s, c) = angle.sin_cos();
            self.cos[i] = c;
            self.cos[i + half] = c;
            self.sin[i] = s;
            self.sin[i + half] = s;
        }
    }

    /// Runs the projections `lins` on one input vector (shared as one
    /// tensor) and copies each result into its `outs` slot.
    fn project(lins: &[&Linear], input: &[f32], outs: &mut [&mut [f32]]) -> Result<()> {
        let x = Tensor::from_slice(input).view([1, input.len() as i64]);
        for (lin, out) in lins.iter().zip(outs.iter_mut()) {
            let y = lin.forward(&x);
            let n = out.len();
            if y.numel() != n || y.kind() != Kind::Float {
                return Err(EngineError::invalid(
                    "model",
                    format!(
                        "a projection gave {} values of {:?}, expected {n} fp32",
                        y.numel(),
                        y.kind()
                    ),
                ));
            }
            y.copy_data(out, n);
        }
        Ok(())
    }

    fn layer(&mut self, l: usize) -> Result<()> {
        let model: &'m LlamaModel = self.model;
        let layer = &model.layers[l];
        let d = self.head_dim;
        // Attention block.
        rms_norm(&self.x, &self.norms[l].input, self.eps, &mut self.h);
        let a = &layer.self_attn;
        Self::project(
            &[&a.q_proj, &a.k_proj, &a.v_proj],
            &self.h,
            &mut [&mut self.q, &mut self.k, &mut self.v],
        )?;
        for head in self.q.chunks_exact_mut(d) {
            rope(head, &self.cos, &self.sin);
        }
        for head in self.k.chunks_exact_mut(d) {
            rope(head, &self.cos, &self.sin);
        }
        let (cap, pos) = (self.capacity, self.len);
        for g in 0..self.kv_heads {
            let at = (g * cap + pos) * d;
            self.keys[l][at..at + d].copy_from_slice(&self.k[g * d..(g + 1) * d]);
            self.values[l][at..at + d].copy_from_slice(&self.v[g * d..(g + 1) * d]);
        }
        let first = match self.window {
            Some(w) if pos + 1 > w => pos + 1 - w,
            _ => 0,
        };
        let n_rep = self.heads / self.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let span = pos + 1 - first;
        // Scores of the n_rep query heads sharing each key head: `[n_rep][span]`.
        self.scores.clear();
        self.scores.resize(n_rep * span, 0.0);
        for g in 0..self.kv_heads {
            let base = g * cap * d;
            let keys = &self.keys[l][base + first * d..base + (pos + 1) * d];
            for r in 0..n_rep {
                let q = &self.q[(g * n_rep + r) * d..(g * n_rep + r + 1) * d];
                let row = &mut self.scores[r * span..(r + 1) * span];
                for (s, k) in row.iter_mut().zip(keys.chunks_exact(d)) {
                    *s = dot(q, k) * scale;
                }
                softmax_in_place(row);
            }
            let values = &self.values[l][base + first * d..base + (pos + 1) * d];
            for r in 0..n_rep {
                let head = g * n_rep + r;
                let out = &mut self.attn[head * d..(head + 1) * d];
                out.fill(0.0);
                let row = &self.scores[r * span..(r + 1) * span];
                for (&p, v) in row.iter().zip(values.chunks_exact(d)) {
                    axpy(p, v, out);
                }
            }
        }
        Self::project(&[&a.o_proj], &self.attn, &mut [&mut self.h])?;
        for (x, o) in self.x.iter_mut().zip(&self.h) {
            *x += o;
        }
        // MLP block.
        rms_norm(
            &self.x,
            &self.norms[l].post_attention,
            self.eps,
            &mut self.h,
        );
        let m = &layer.mlp;
        Self::project(
            &[&m.gate_proj, &m.up_proj],
            &self.h,
            &mut [&mut self.gate, &mut self.up],
        )?;
        for (g, u) in self.gate.iter_mut().zip(&self.up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        Self::project(&[&m.down_proj], &self.gate, &mut [&mut self.h])?;
        for (x, o) in self.x.iter_mut().zip(&self.h) {
            *x += o;
        }
        Ok(())
    }
}

/// Copies the first `len` positions of a `[kv_heads][from_cap][head_dim]`
/// buffer into a new zeroed `[kv_heads][to_cap][head_dim]` one.
fn relayout(
    src: &[f32],
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    from_cap: usize,
    to_cap: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; kv_heads * to_cap * head_dim];
    let n = len * head_dim;
    for g in 0..kv_heads {
        let (from, to) = (g * from_cap * head_dim, g * to_cap * head_dim);
        out[to..to + n].copy_from_slice(&src[from..from + n]);
    }
    out
}

/// `out = w · x / sqrt(mean(x²) + eps)` (the mean accumulated in f64).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let mean = (ss / x.len() as f64) as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// Softmax over `row` in place (max subtracted, sums in f32).
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for s in row.iter_mut() {
        *s = (*s - max).exp();
    }
    let inv = 1.0 / row.iter().sum::<f32>();
    for s in row.iter_mut() {
        *s *= inv;
    }
}

/// Rotates one head in place: `x·cos + rotate_half(x)·sin`.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/// Dot product with eight independent partial sums (so it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out += alpha · x`.
fn axpy(alpha: f32, x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{GenerationConfig, generate};
    use crate::testutil::{attach_live_lora, max_abs_diff, tiny_models};

    fn load(arch: &str) -> LlamaModel {
        LlamaModel::load(&tiny_models().join(arch), Kind::Float, Device::Cpu)
            .unwrap()
            .0
    }

    /// Prefills `prompt` through the graph, then feeds the same greedy
    /// tokens to the graph and to the fast step; returns the largest logit
    /// difference over `steps` steps. Both caches start too small and grow.
    fn compare(m: &LlamaModel, prompt: &[i64], steps: usize) -> f64 {
        let _g = tch::no_grad_guard();
        let ids = Tensor::from_slice(prompt).view([1, -1]);
        let mut cache = KvCache::new(m, 1, 2);
        let h = m
            .forward_hidden_t(&ids, None, None, Some(&mut cache), false)
            .unwrap();
        let last = h.narrow(1, prompt.len() as i64 - 1, 1).squeeze_dim(1);
        let mut next = i64::try_from(m.lm_head.forward(&last).argmax(-1, false).get(0)).unwrap();
        let mut fast = FastDecoder::from_cache(m, &cache, prompt.len() + 1).unwrap();
        assert_eq!(fast.len(), prompt.len());
        let mut worst = 0.0f64;
        for _ in 0..steps {
            let graph = m
                .forward(
                    &Tensor::from_slice(&[next]).view([1, 1]),
                    None,
                    Some(&mut cache),
                )
                .unwrap()
                .view([1, -1]);
            let ours = fast.step(next).unwrap();
            assert_eq!(ours.size(), graph.size());
            worst = worst.max(max_abs_diff(&graph, &ours));
            next = i64::try_from(graph.argmax(-1, false).get(0)).unwrap();
        }
        assert_eq!(fast.len(), prompt.len() + steps);
        worst
    }

    #[test]
    fn the_fast_step_equals_the_graph_forward_on_every_architecture() {
        // llama: plain; mistral: sliding window of 6 that the 17 positions
        // exceed; qwen2: q/k/v biases, grouped-query attention.
        let prompt = [5i64, 17, 99, 3, 250];
        for arch in ["llama", "mistral", "qwen2"] {
            let m = load(arch);
            let d = compare(&m, &prompt, 12);
            assert!(d < 1e-5, "{arch}: logits differ by {d}");
        }
    }

    #[test]
    fn the_fast_step_applies_lora_adapters_like_the_graph() {
        let mut m = load("qwen2");
        tch::manual_seed(3);
        attach_live_lora(&mut m);
        let d = compare(&m, &[7, 8, 9], 6);
        assert!(d < 1e-5, "logits differ by {d}");
        // The adapter changes the logits, so the comparison saw it.
        let off = load("qwen2");
        let ids = Tensor::from_slice(&[7i64, 8, 9]).view([1, 3]);
        let with = tch::no_grad(|| m.forward(&ids, None, None).unwrap());
        let without = tch::no_grad(|| off.forward(&ids, None, None).unwrap());
        assert!(max_abs_diff(&with, &without) > 1e-3);
    }

    #[test]
    fn generation_gives_the_same_tokens_with_and_without_the_fast_step() {
        let m = load("mistral");
        for cfg in [
            GenerationConfig {
                max_new_tokens: 20,
                ..Default::default()
            },
            GenerationConfig {
                max_new_tokens: 20,
                temperature: 0.9,
                top_p: Some(0.95),
                repetition_penalty: 1.2,
                seed: Some(11),
                ..Default::default()
            },
        ] {
            let prompt = vec![vec![4i64, 40, 41, 42]];
            let before = STEPS.with(std::cell::Cell::get);
            let fast = generate(&m, &prompt, &cfg, None).unwrap();
            // The prefill gives the first token; the other 19 come from the fast step.
            assert_eq!(STEPS.with(std::cell::Cell::get) - before, 19);
            let before = STEPS.with(std::cell::Cell::get);
            let graph = generate(
                &m,
                &prompt,
                &GenerationConfig {
                    fast_decode: false,
                    ..cfg.clone()
                },
                None,
            )
            .unwrap();
            assert_eq!(
                STEPS.with(std::cell::Cell::get),
                before,
                "fast_decode: false"
            );
            assert_eq!(fast[0].token_ids.len(), 20);
            assert_eq!(fast[0].token_ids, graph[0].token_ids, "{cfg:?}");
        }
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let m = load("llama");
        let cache = KvCache::new(&m, 2, 4);
        let err = FastDecoder::from_cache(&m, &cache, 8).unwrap_err();
        assert!(err.to_string().contains("one sequence"), "{err}");
        let mut f = FastDecoder::from_cache(&m, &KvCache::new(&m, 1, 4), 8).unwrap();
        assert!(f.is_empty());
        let vocab = m.config.vocab_size as i64;
        let err = f.step(vocab).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        // An empty cache is a valid start: the first step is position 0.
        let logits = f.step(1).unwrap();
        let graph = tch::no_grad(|| {
            m.forward(&Tensor::from_slice(&[1i64]).view([1, 1]), None, None)
                .unwrap()
        });
        assert!(max_abs_diff(&logits, &graph.view([1, -1])) < 1e-5);
        let bf16 = LlamaModel::load(&tiny_models().join("llama"), Kind::BFloat16, Device::Cpu)
            .unwrap()
            .0;
        assert!(!FastDecoder::supports(&bf16));
        let err = FastDecoder::from_cache(&bf16, &KvCache::new(&bf16, 1, 4), 8).unwrap_err();
        assert!(err.to_string().contains("fp32"), "{err}");
    }
}
