//! The decoder-only Llama-family forward pass (Llama 2/3, Mistral, Qwen2):
//! embeddings, RMSNorm, rotary attention with grouped-query heads through
//! libtorch's scaled-dot-product attention (causal, padding and sliding-window
//! masks), SwiGLU MLP, tied or separate `lm_head`, and a KV cache.
//!
//! Config ([`crate::config`]), weight loading ([`crate::weights`]) and the
//! forward pass (here) are kept apart; module and tensor names are the
//! Hugging Face names (`model.layers.3.self_attn.q_proj.weight`).

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::nn::{Embedding, Linear, RmsNorm};
use crate::weights::{LoadReport, TensorStore, WeightLoader};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Self-attention of one decoder layer.
#[derive(Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

/// The gated (SwiGLU) MLP: `down(silu(gate(x)) · up(x))`.
#[derive(Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

/// One pre-norm decoder layer.
#[derive(Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: Mlp,
}

/// A Llama-family causal language model.
#[derive(Debug)]
pub struct LlamaModel {
    /// The configuration it was built from.
    pub config: ModelConfig,
    /// `model.embed_tokens`.
    pub embed_tokens: Embedding,
    /// `model.layers.N`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head` (shares the embedding's storage when tied).
    pub lm_head: Linear,
    inv_freq: Tensor,
    device: Device,
    kind: Kind,
}

/// Key/value cache for incremental decoding: one preallocated buffer per
/// layer, `[batch, kv_heads, capacity, head_dim]`, grown when full.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new(model: &LlamaModel, batch: i64, capacity: i64) -> Self {
        let c = &model.config;
        let shape = [
            batch,
            c.num_kv_heads as i64,
            capacity.max(1),
            c.head_dim as i64,
        ];
        let opts = (model.kind, model.device);
        Self {
            keys: (0..c.num_layers)
                .map(|_| Tensor::zeros(shape, opts))
                .collect(),
            values: (0..c.num_layers)
                .map(|_| Tensor::zeros(shape, opts))
                .collect(),
            len: 0,
            capacity: capacity.max(1),
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the rows `index` (a 1-D int64 tensor) of the batch, e.g. to
    /// drop finished sequences.
    pub fn select_rows(&mut self, index: &Tensor) {
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *t = t.index_select(0, index);
        }
    }

    fn ensure(&mut self, needed: i64) {
        if needed <= self.capacity {
            return;
        }
        let new_cap = needed.max(self.capacity * 2);
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut size = t.size();
            size[2] = new_cap;
            let bigger = Tensor::zeros(&size, (t.kind(), t.device()));
            bigger
                .narrow(2, 0, self.len)
                .copy_(&t.narrow(2, 0, self.len));
            *t = bigger;
        }
        self.capacity = new_cap;
    }

    /// Views of the cached keys and values of `layer`,
    /// `[batch, kv_heads, capacity, head_dim]` (the first [`Self::len`] positions are filled).
    pub(crate) fn layer(&self, layer: usize) -> (Tensor, Tensor) {
        (
            self.keys[layer].shallow_clone(),
            self.values[layer].shallow_clone(),
        )
    }

    /// Writes this step's keys/values of `layer` after the cached ones and
    /// returns views of all of them.
    fn update(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let end = self.len + t;
        self.keys[layer].narrow(2, self.len, t).copy_(k);
        self.values[layer].narrow(2, self.len, t).copy_(v);
        (
            self.keys[layer].narrow(2, 0, end),
            self.values[layer].narrow(2, 0, end),
        )
    }
}

/// RoPE tables and attention pattern shared by the layers of one forward
/// (made by [`LlamaModel::layer_context`]).
pub struct LayerContext {
    cos: Tensor,
    sin: Tensor,
    mask: Mask,
}

impl std::fmt::Debug for LayerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerContext")
            .field("positions", &self.cos.size())
            .finish_non_exhaustive()
    }
}

/// How attention is masked in one forward.
enum Mask {
    /// No mask (one query attending to everything cached).
    None,
    /// Plain causal (no cache, no padding).
    Causal,
    /// Explicit boolean mask `[B or 1, 1, T, S]` (true = attend).
    Explicit(Tensor),
}

fn rope_inv_freq(config: &ModelConfig) -> Tensor {
    let d = config.head_dim as i64;
    // Same arithmetic as transformers: exponent in fp32, power and reciprocal in fp32.
    let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / d as f64;
    let base = Tensor::from(config.rope_theta as f32);
    let inv: Tensor = base.pow(&exponent).reciprocal();
    match config.rope_scaling {
        RopeScaling::Default => inv,
        RopeScaling::Linear { factor } => inv / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: orig,
        } => {
            let low_wavelen = orig / low_freq_factor;
            let high_wavelen = orig / high_freq_factor;
            let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = inv.where_self(&wavelen.le(low_wavelen), &(&inv / factor));
            let smooth = (wavelen.reciprocal() * orig - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed: Tensor = (smooth.neg() + 1.0) * &scaled / factor + &smooth * &scaled;
            let is_medium = wavelen
                .ge(high_wavelen)
                .logical_and(&wavelen.le(low_wavelen));
            smoothed.where_self(&is_medium, &scaled)
        }
    }
}

impl LlamaModel {
    /// Reads `config.json` and the safetensors weights of a model folder.
    /// Weights are converted to `kind` (fp32 for training and parity).
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<(Self, LoadReport)> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = TensorStore::load_dir(dir, kind, device)?;
        Self::from_store(config, store)
    }

    /// Builds the model from named tensors; every tensor must be used and every
    /// needed tensor present (see [`LoadReport`]).
    pub fn from_store(config: ModelConfig, store: TensorStore) -> Result<(Self, LoadReport)> {
        let (kind, device) = match store.tensors.values().next() {
            Some(t) => (t.kind(), t.device()),
            None => (Kind::Float, Device::Cpu),
        };
        let mut w = WeightLoader::new(store);
        let c = &config;
        let (h, v, i) = (
            c.hidden_size as i64,
            c.vocab_size as i64,
            c.intermediate_size as i64,
        );
        let (nh, nkv, d) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
        let linear = |w: &mut WeightLoader, name: &str, out: i64, inp: i64, bias: bool| {
            let weight = w.take(&format!("{name}.weight"), &[out, inp]);
            let bias = bias.then(|| w.take(&format!("{name}.bias"), &[out]));
            Linear::new(weight, bias)
        };
        let norm = |w: &mut WeightLoader, name: &str| RmsNorm {
            weight: w.take(&format!("{name}.weight"), &[h]),
            eps: c.rms_norm_eps,
        };
        let embed = w.take("model.embed_tokens.weight", &[v, h]);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            w.ignore(
                &format!("{p}.self_attn.rotary_emb.inv_freq"),
                "RoPE frequencies are recomputed from the config",
            );
            layers.push(DecoderLayer {
                input_layernorm: norm(&mut w, &format!("{p}.input_layernorm")),
                self_attn: Attention {
                    q_proj: linear(
                        &mut w,
                        &format!("{p}.self_attn.q_proj"),
                        nh * d,
                        h,
                        c.qkv_bias,
                    ),
                    k_proj: linear(
                        &mut w,
                        &format!("{p}.self_attn.k_proj"),
                        nkv * d,
                        h,
                        c.qkv_bias,
                    ),
                    v_proj: linear(
                        &mut w,
                        &format!("{p}.self_attn.v_proj"),
                        nkv * d,
                        h,
                        c.qkv_bias,
                    ),
                    o_proj: linear(
                        &mut w,
                        &format!("{p}.self_attn.o_proj"),
                        h,
                        nh * d,
                        c.o_bias,
                    ),
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: d,
                },
                post_attention_layernorm: norm(&mut w, &format!("{p}.post_attention_layernorm")),
                mlp: Mlp {
                    gate_proj: linear(&mut w, &format!("{p}.mlp.gate_proj"), i, h, c.mlp_bias),
                    up_proj: linear(&mut w, &format!("{p}.mlp.up_proj"), i, h, c.mlp_bias),
                    down_proj: linear(&mut w, &format!("{p}.mlp.down_proj"), h, i, c.mlp_bias),
                },
            });
        }
        let final_norm = norm(&mut w, "model.norm");
        let lm_head = if c.tie_word_embeddings {
            w.ignore(
                "lm_head.weight",
                "tie_word_embeddings: lm_head shares model.embed_tokens.weight",
            );
            Linear::new(embed.shallow_clone(), None)
        } else {
            linear(&mut w, "lm_head", v, h, false)
        };
        let report = w.finish()?;
        let inv_freq = rope_inv_freq(c).to_device(device);
        Ok((
            Self {
                config,
                embed_tokens: Embedding { weight: embed },
                layers,
                norm: final_norm,
                lm_head,
                inv_freq,
                device,
                kind,
            },
            report,
        ))
    }

    /// RoPE inverse frequencies `[head_dim / 2]` (fp32, scaling applied).
    pub(crate) fn inv_freq(&self) -> &Tensor {
        &self.inv_freq
    }

    /// Device of the weights.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Floating-point kind of the weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Every linear projection by its Hugging Face module name
    /// (`model.layers.3.self_attn.q_proj`, ..., `lm_head`).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let a = &layer.self_attn;
            let m = &layer.mlp;
            out.push((format!("{p}.self_attn.q_proj"), &a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &m.down_proj));
        }
        out.push(("lm_head".to_owned(), &self.lm_head));
        out
    }

    /// Mutable access to every linear projection by Hugging Face module name
    /// (same order as [`Self::linears`]), to attach or remove LoRA adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            let a = &mut layer.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut layer.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out.push(("lm_head".to_owned(), &mut self.lm_head));
        out
    }

    /// The base weights by Hugging Face tensor name (shallow copies sharing
    /// storage); `lm_head.weight` is left out when tied, as transformers saves it.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_owned(),
            self.embed_tokens.weight.shallow_clone(),
        )];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.weight.shallow_clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.shallow_clone(),
            ));
        }
        for (name, lin) in self.linears() {
            if name == "lm_head" && self.config.tie_word_embeddings {
                continue;
            }
            out.push((format!("{name}.weight"), lin.weight.shallow_clone()));
            if let Some(b) = &lin.bias {
                out.push((format!("{name}.bias"), b.shallow_clone()));
            }
        }
        out.push((
            "model.norm.weight".to_owned(),
            self.norm.weight.shallow_clone(),
        ));
        out
    }

    /// Logits `[B, T, vocab]` for `input_ids` `[B, T]`, in evaluation mode.
    ///
    /// `attention_mask` is `[B, past + T]` (1 = token, 0 = padding) and covers
    /// the cached positions too; `None` means no padding. With a `cache`, the
    /// new keys/values are appended and attention covers the cached ones.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden_t(input_ids, attention_mask, None, cache, false)?;
        Ok(self.lm_head.forward(&hidden))
    }

    /// The final hidden states `[B, T, hidden]` (after the last norm, before
    /// `lm_head`), so that callers can project only the positions they need
    /// (e.g. a chunked cross-entropy). `position_ids` `[B, T]` override the
    /// positions derived from the mask; `train` enables LoRA dropout.
    pub fn forward_hidden_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let size = input_ids.size();
        let [b, t] = size[..] else {
            return Err(EngineError::invalid(
                "input_ids",
                format!("expected shape [batch, seq], got {size:?}"),
            ));
        };
        if t == 0 {
            return Err(EngineError::invalid("input_ids", "empty sequence"));
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        let total = past + t;
        if let Some(m) = attention_mask
            && m.size() != [b, total]
        {
            return Err(EngineError::invalid(
                "attention_mask",
                format!(
                    "expected shape [{b}, {total}] (batch, cached + new tokens), got {:?}",
                    m.size()
                ),
            ));
        }
        if let Some(c) = cache.as_deref_mut() {
            if c.keys.first().is_some_and(|k| k.size()[0] != b) {
                return Err(EngineError::invalid(
                    "cache",
                    format!("the cache holds another batch size than {b}"),
                ));
            }
            c.ensure(total);
        }
        let ids = input_ids.to_device(self.device);
        // A mask of all ones is no mask.
        let mask = attention_mask
            .map(|m| m.to_device(self.device).to_kind(Kind::Int64))
            .filter(|m| m.min().int64_value(&[]) == 0);

        let positions = match (position_ids, &mask) {
            (Some(p), _) => p.to_device(self.device).to_kind(Kind::Int64),
            (None, Some(m)) => {
                let p = m.cumsum(-1, Kind::Int64) - 1;
                let p = p.masked_fill(&m.eq(0), 1);
                p.narrow(1, past, t)
            }
            (None, None) => Tensor::arange_start(past, total, (Kind::Int64, self.device))
                .unsqueeze(0)
                .expand([b, t], false),
        };
        let attn_mask = self.build_mask(mask.as_ref(), past, t);
        self.run_layers(&ids, &positions, &attn_mask, cache, train)
    }

    /// The final hidden states with an explicit attention pattern, for packed
    /// rows: `attend` is boolean `[B or 1, 1, T, T]` (true = may attend; every
    /// query must see at least itself), e.g. block-diagonal causal so that no
    /// sample sees another; `position_ids` `[B, T]` restart at 0 per sample.
    /// No KV cache.
    pub fn forward_hidden_attend(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attend: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let size = input_ids.size();
        let [b, t] = size[..] else {
            return Err(EngineError::invalid(
                "input_ids",
                format!("expected shape [batch, seq], got {size:?}"),
            ));
        };
        if position_ids.size() != [b, t] {
            return Err(EngineError::invalid(
                "position_ids",
                format!("expected shape [{b}, {t}], got {:?}", position_ids.size()),
            ));
        }
        let m = attend.size();
        if m.len() != 4 || (m[0] != b && m[0] != 1) || m[1] != 1 || m[2] != t || m[3] != t {
            return Err(EngineError::invalid(
                "attend",
                format!("expected shape [{b} or 1, 1, {t}, {t}], got {m:?}"),
            ));
        }
        let ids = input_ids.to_device(self.device);
        let positions = position_ids.to_device(self.device).to_kind(Kind::Int64);
        let mask = Mask::Explicit(self.windowed(attend, t));
        self.run_layers(&ids, &positions, &mask, None, train)
    }

    /// Embedding, the decoder layers and the final norm.
    fn run_layers(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attn_mask: &Mask,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rope_tables(positions);
        let t = ids.size()[1];
        let total = cache.as_ref().map_or(0, |c| c.len()) + t;
        let mut x = self.embed_tokens.forward(ids);
        for l in 0..self.layers.len() {
            x = self.layer_forward(
                l,
                &x,
                &cos,
                &sin,
                attn_mask,
                cache.as_deref_mut().map(|c| (c, l)),
                train,
            );
        }
        if let Some(c) = cache {
            c.len = total;
        }
        Ok(self.norm.forward(&x))
    }

    /// Decoder layer `l` on the residual stream `x`.
    #[allow(clippy::too_many_arguments)] // The private core of every forward path.
    fn layer_forward(
        &self,
        l: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attn_mask: &Mask,
        cache: Option<(&mut KvCache, usize)>,
        train: bool,
    ) -> Tensor {
        let layer = &self.layers[l];
        let h = layer.input_layernorm.forward(x);
        let h = layer
            .self_attn
            .forward(&h, cos, sin, attn_mask, cache, train);
        let x = x + h;
        let h = layer.post_attention_layernorm.forward(&x);
        let m = &layer.mlp;
        let g = m.gate_proj.forward_t(&h, train).silu();
        let u = m.up_proj.forward_t(&h, train);
        &x + m.down_proj.forward_t(&(g * u), train)
    }

    /// The per-forward state of a layer-by-layer training pass (activation
    /// checkpointing): RoPE tables and the attention pattern (`attend`
    /// `[B|1,1,T,T]` for packed rows, else causal). No KV cache.
    pub fn layer_context(
        &self,
        position_ids: &Tensor,
        attend: Option<&Tensor>,
    ) -> Result<LayerContext> {
        let positions = position_ids.to_device(self.device).to_kind(Kind::Int64);
        let t = positions.size().last().copied().unwrap_or(0);
        if t == 0 {
            return Err(EngineError::invalid("position_ids", "empty sequence"));
        }
        let (cos, sin) = self.rope_tables(&positions);
        let mask = match attend {
            Some(a) => Mask::Explicit(self.windowed(a, t)),
            None => self.build_mask(None, 0, t),
        };
        Ok(LayerContext { cos, sin, mask })
    }

    /// Token embeddings `[B, T, hidden]` of `input_ids` (the first step of a
    /// layer-by-layer pass).
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        self.embed_tokens.forward(&input_ids.to_device(self.device))
    }

    /// Decoder layer `l` of a layer-by-layer pass (see [`Self::layer_context`]).
    pub fn layer(&self, l: usize, x: &Tensor, ctx: &LayerContext, train: bool) -> Tensor {
        self.layer_forward(l, x, &ctx.cos, &ctx.sin, &ctx.mask, None, train)
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The final norm (after the last layer, before `lm_head`).
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    /// `cos` and sign-folded `sin` tables `[B, 1, T, head_dim]` for positions `[B, T]`.
    pub(crate) fn rope_tables(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let cos = freqs.cos();
        let sin = freqs.sin();
        let cos = Tensor::cat(&[&cos, &cos], -1)
            .unsqueeze(1)
            .to_kind(self.kind);
        // rotate_half(x) = cat(-x2, x1); we rotate with cat(x2, x1) and fold the sign into sin.
        let sin = Tensor::cat(&[&(-&sin), &sin], -1)
            .unsqueeze(1)
            .to_kind(self.kind);
        (cos, sin)
    }

    /// A caller's boolean attention pattern `[B|1, 1, T, T]` on the model's
    /// device, narrowed to the sliding window when the model has one that
    /// the `t` tokens exceed (packed Mistral rows keep the window).
    fn windowed(&self, attend: &Tensor, t: i64) -> Tensor {
        let attend = attend.to_device(self.device).to_kind(Kind::Bool);
        match self.config.sliding_window.map(|w| w as i64) {
            Some(w) if t > w => {
                let q = Tensor::arange(t, (Kind::Int64, self.device)).view([t, 1]);
                let k = Tensor::arange(t, (Kind::Int64, self.device)).view([1, t]);
                attend.logical_and(&(q - k).lt(w).view([1, 1, t, t]))
            }
            _ => attend,
        }
    }

    fn build_mask(&self, pad_mask: Option<&Tensor>, past: i64, t: i64) -> Mask {
        let total = past + t;
        let window = self.config.sliding_window.map(|w| w as i64);
        let window_bites = window.is_some_and(|w| total > w);
        if pad_mask.is_none() && !window_bites {
            if t == 1 {
                return Mask::None;
            }
            if past == 0 {
                return Mask::Causal;
            }
        }
        let q = Tensor::arange_start(past, total, (Kind::Int64, self.device)).view([t, 1]);
        let k = Tensor::arange(total, (Kind::Int64, self.device)).view([1, total]);
        let mut allowed = k.le_tensor(&q);
        if let Some(w) = window {
            allowed = allowed.logical_and(&(&q - &k).lt(w));
        }
        let mut allowed = allowed.view([1, 1, t, total]);
        if let Some(m) = pad_mask {
            let keys = m.ne(0).view([-1, 1, 1, total]);
            // A padding query would see nothing; let it see itself so no row is empty.
            let diag = k.eq_tensor(&q).view([1, 1, t, total]);
            allowed = allowed.logical_and(&keys).logical_or(&diag);
        }
        Mask::Explicit(allowed)
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Mask,
        cache: Option<(&mut KvCache, usize)>,
        train: bool,
    ) -> Tensor {
        let size = x.size();
        let (b, t) = (size[0], size[1]);
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward_t(x, train)
            .view([b, t, nh, d])
            .transpose(1, 2);
        let k = self
            .k_proj
            .forward_t(x, train)
            .view([b, t, nkv, d])
            .transpose(1, 2);
        let v = self
            .v_proj
            .forward_t(x, train)
            .view([b, t, nkv, d])
            .transpose(1, 2);
        let q = apply_rope(&q, cos, sin, d);
        let k = apply_rope(&k, cos, sin, d);
        let (k, v) = match cache {
            Some((c, layer)) => c.update(layer, &k, &v),
            None => (k, v),
        };
        let gqa = nkv != nh;
        let out = match mask {
            Mask::None => Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, false, None, gqa,
            ),
            Mask::Causal => Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, None, gqa,
            ),
            Mask::Explicit(m) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, gqa)
            }
        };
        let out = out.transpose(1, 2).reshape([b, t, nh * d]);
        self.o_proj.forward_t(&out, train)
    }
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, d: i64) -> Tensor {
    let half = d / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    let rotated = Tensor::cat(&[&x2, &x1], -1);
    x * cos + rotated * sin
}
