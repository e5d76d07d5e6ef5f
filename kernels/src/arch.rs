//! The architectures sampo runs, each described once, as data.
//!
//! A description says which tensors a layer has beyond the Llama core (QK-norm,
//! post-norms), its activation, how RoPE pairs a head's dimensions, how token
//! embeddings are scaled, which layers attend through a sliding window and with which
//! RoPE base. The loader reads the table to know which keys and tensors to expect;
//! the forward pass reads the loaded fields (`Model::spec`, `Layer`), never an
//! architecture's name. Adding an architecture of the same family is a table entry.

use serde::Serialize;

/// The gate's activation in the gated FFN `down(act(gate · x) * (up · x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x / (1 + e^-x)` ([`crate::math::silu`]).
    Silu,
    /// GELU, tanh approximation ([`crate::math::gelu_tanh`]).
    GeluTanh,
}

/// How RoPE pairs the dimensions of a head it rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopePairs {
    /// `(x[2i], x[2i+1])`: llama.cpp's "normal" RoPE (Llama).
    Adjacent,
    /// `(x[i], x[i + rope_dim/2])`: llama.cpp's "neox" RoPE (Gemma).
    Halves,
}

/// What token embeddings are multiplied by before the first layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbedScale {
    None,
    /// `sqrt(n_embd)`, rounded to f32 once (Gemma).
    SqrtEmbd,
}

/// Which layers attend to the whole sequence and which through a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerPattern {
    AllGlobal,
    /// Layer `i` is global when `i % period == period - 1`, local otherwise (Gemma 3:
    /// period 6, llama.cpp's `set_swa_pattern(6)`). Local layers see the last
    /// `{arch}.attention.sliding_window` positions, the current one included, and use
    /// their own RoPE base.
    LocalThenGlobal {
        period: usize,
        local_rope_base: f32,
    },
}

/// One architecture, as the loader and the forward pass need it.
#[derive(Debug, PartialEq, Serialize)]
pub struct ArchSpec {
    /// `general.architecture` in GGUF, also the prefix of its hyper-parameter keys.
    pub name: &'static str,
    pub activation: Activation,
    pub rope_pairs: RopePairs,
    pub embed_scale: EmbedScale,
    /// RMSNorm over each head of Q and of K before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMSNorm on the attention output and on the FFN output before each residual add
    /// (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    pub layers: LayerPattern,
    /// `rope.freq_base` when the file has none.
    pub default_rope_base: f32,
    /// `attention.layer_norm_rms_epsilon` when the file has none.
    pub default_rms_eps: f32,
    /// The chat template when the file carries none (`tokenizer.chat_template`).
    pub default_chat_template: &'static str,
    /// Whether the CUDA backend implements every op this architecture needs.
    pub on_cuda: bool,
}

pub const LLAMA: ArchSpec = ArchSpec {
    name: "llama",
    activation: Activation::Silu,
    rope_pairs: RopePairs::Adjacent,
    embed_scale: EmbedScale::None,
    qk_norm: false,
    post_norms: false,
    layers: LayerPattern::AllGlobal,
    default_rope_base: 10_000.0,
    default_rms_eps: 1e-5,
    default_chat_template: crate::chat::CHATML,
    on_cuda: true,
};

/// Gemma 3 (text), as llama.cpp's `gemma3` graph: attention scale `1/sqrt(key_length)`
/// (the 27B model's `query_pre_attn_scalar` differs and is not handled), no final
/// logit soft-capping (llama.cpp applies none with sliding-window layers), the output
/// head tied to `token_embd` when the file has no `output.weight`.
pub const GEMMA3: ArchSpec = ArchSpec {
    name: "gemma3",
    activation: Activation::GeluTanh,
    rope_pairs: RopePairs::Halves,
    embed_scale: EmbedScale::SqrtEmbd,
    qk_norm: true,
    post_norms: true,
    layers: LayerPattern::LocalThenGlobal { period: 6, local_rope_base: 10_000.0 },
    default_rope_base: 1_000_000.0,
    default_rms_eps: 1e-6,
    default_chat_template: crate::chat::GEMMA,
    on_cuda: true,
};

/// Every architecture sampo runs.
pub const ARCHS: [&ArchSpec; 2] = [&LLAMA, &GEMMA3];

/// The description of `general.architecture = name`, if sampo runs it.
pub fn lookup(name: &str) -> Option<&'static ArchSpec> {
    ARCHS.iter().copied().find(|a| a.name == name)
}

/// The names sampo runs, for error messages.
pub fn supported() -> String {
    ARCHS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}

impl LayerPattern {
    /// Whether layer `i` attends through the sliding window.
    pub fn is_local(&self, i: usize) -> bool {
        match *self {
            LayerPattern::AllGlobal => false,
            LayerPattern::LocalThenGlobal { period, .. } => period > 0 && i % period != period - 1,
        }
    }

    pub fn has_local(&self) -> bool {
        matches!(self, LayerPattern::LocalThenGlobal { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma3_pattern_is_every_sixth_layer_global() {
        let global: Vec<usize> = (0..18).filter(|&i| !GEMMA3.layers.is_local(i)).collect();
        assert_eq!(global, vec![5, 11, 17]);
        assert!((0..30).all(|i| !LLAMA.layers.is_local(i)));
    }

    #[test]
    fn lookup_by_gguf_name() {
        assert_eq!(lookup("gemma3"), Some(&GEMMA3));
        assert_eq!(lookup("llama"), Some(&LLAMA));
        assert_eq!(lookup("gemma2"), None);
        assert_eq!(supported(), "llama, gemma3");
    }
}
