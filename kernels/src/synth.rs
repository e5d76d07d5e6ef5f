//! Tiny synthetic models: valid GGUF, Q4_1/Q4_0/Q8_0 matrices and deterministic
//! weights from a seed. A Llama one with a byte-level BPE vocabulary (a few merges,
//! ChatML specials), and a Gemma 3 one with a SentencePiece vocabulary (byte
//! fallback, Gemma's turn markers) and every Gemma 3 feature: wide heads, QK-norm,
//! post-norms, GELU, scaled embeddings, local and global layers with a short window.
//! They run through exactly the code paths of real models, so tests and a first
//! testnet need no download.

use crate::gguf::{GgmlType, GgufWriter, MetaValue};
use crate::quant::quantize_row;
use crate::tokenizer::{TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED};

#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub seed: u64,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    pub arch: SynthArch,
    /// Every matrix (embedding included) in this type; `None`: the default mix of
    /// Q8_0, Q4_1 and Q4_0. A K-quant needs `n_embd` and `n_ff` multiples of 256.
    pub weights: Option<GgmlType>,
}

/// Which architecture (and tokenizer) the synthetic model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthArch {
    Llama,
    /// Gemma 3 with heads `head_dim` wide (make it more than `n_embd / n_head`, as
    /// Gemma's are) and a sliding window of `sliding_window` positions.
    Gemma3 {
        head_dim: usize,
        sliding_window: usize,
    },
}

impl Default for SynthSpec {
    fn default() -> Self {
        Self {
            seed: 1,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_ctx: 1024,
            arch: SynthArch::Llama,
            weights: None,
        }
    }
}

impl SynthSpec {
    /// A Gemma 3: seven layers (six local, the sixth global, one local after it),
    /// heads twice the usual width, a window of 8 positions.
    pub fn gemma3() -> Self {
        Self {
            n_layer: 7,
            n_head_kv: 1,
            arch: SynthArch::Gemma3 { head_dim: 32, sliding_window: 8 },
            ..Self::default()
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Sum of two uniforms: a cheap bell shape in (-1, 1).
        let a = (z >> 40) as f32 / (1u64 << 24) as f32;
        let b = ((z >> 16) & 0xFF_FFFF) as f32 / (1u64 << 24) as f32;
        a + b - 1.0
    }
}

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 8] =
    [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("a", "n"), ("o", "n")];

/// The GGUF bytes of the synthetic model.
pub fn synthesize(spec: &SynthSpec) -> Vec<u8> {
    match spec.arch {
        SynthArch::Llama => synthesize_llama(spec),
        SynthArch::Gemma3 { head_dim, sliding_window } => synthesize_gemma3(spec, head_dim, sliding_window),
    }
}

fn synthesize_llama(spec: &SynthSpec) -> Vec<u8> {
    let mut rng = Rng(spec.seed);
    let byte_chars = crate::tokenizer::byte_chars();
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![TOKEN_TYPE_CONTROL; SPECIALS.len()];
    for c in byte_chars {
        tokens.push(c.to_string());
        types.push(TOKEN_TYPE_NORMAL);
    }
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
        types.push(TOKEN_TYPE_NORMAL);
    }
    let n_vocab = tokens.len();
    let hd = spec.n_embd / spec.n_head;
    let kvd = hd * spec.n_head_kv;
    let mut w = GgufWriter::new();
    let s = |v: &str| MetaValue::String(v.to_owned());
    let u32v = |v: usize| MetaValue::U32(v as u32);
    w.meta("general.architecture", s("llama"))
        .meta("general.name", s("sampo-synthetic"))
        .meta("general.seed", MetaValue::U64(spec.seed))
        .meta("llama.context_length", u32v(spec.n_ctx))
        .meta("llama.embedding_length", u32v(spec.n_embd))
        .meta("llama.block_count", u32v(spec.n_layer))
        .meta("llama.feed_forward_length", u32v(spec.n_ff))
        .meta("llama.attention.head_count", u32v(spec.n_head))
        .meta("llama.attention.head_count_kv", u32v(spec.n_head_kv))
        .meta("llama.rope.freq_base", MetaValue::F32(10_000.0))
        .meta("llama.rope.dimension_count", u32v(hd))
        .meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
        .meta("tokenizer.ggml.model", s("gpt2"))
        .meta("tokenizer.ggml.pre", s("smollm"))
        .meta("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()))
        .meta("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()))
        .meta("tokenizer.ggml.merges", MetaValue::Array(MERGES.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect()))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
        .meta("tokenizer.chat_template", s(crate::chat::CHATML));
    let mut mat = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType| {
        let ty = spec.weights.unwrap_or(ty);
        let scale = 1.0 / (cols as f32).sqrt() * 1.7;
        let vals: Vec<f32> = (0..rows * cols).map(|_| rng.next() * scale).collect();
        w.tensor(name, &[cols as u64, rows as u64], ty, quantize_row(ty, &vals));
    };
    mat(&mut w, "token_embd.weight", n_vocab, spec.n_embd, GgmlType::Q8_0);
    let ones = |n: usize| quantize_row(GgmlType::F32, &vec![1.0; n]);
    w.tensor("output_norm.weight", &[spec.n_embd as u64], GgmlType::F32, ones(spec.n_embd));
    for i in 0..spec.n_layer {
        let p = |t: &str| format!("blk.{i}.{t}.weight");
        w.tensor(&p("attn_norm"), &[spec.n_embd as u64], GgmlType::F32, ones(spec.n_embd));
        w.tensor(&p("ffn_norm"), &[spec.n_embd as u64], GgmlType::F32, ones(spec.n_embd));
        mat(&mut w, &p("attn_q"), spec.n_embd, spec.n_embd, GgmlType::Q4_1);
        mat(&mut w, &p("attn_k"), kvd, spec.n_embd, GgmlType::Q4_1);
        mat(&mut w, &p("attn_v"), kvd, spec.n_embd, GgmlType::Q4_0);
        mat(&mut w, &p("attn_output"), spec.n_embd, spec.n_embd, GgmlType::Q4_1);
        mat(&mut w, &p("ffn_gate"), spec.n_ff, spec.n_embd, GgmlType::Q4_1);
        mat(&mut w, &p("ffn_up"), spec.n_ff, spec.n_embd, GgmlType::Q4_1);
        mat(&mut w, &p("ffn_down"), spec.n_embd, spec.n_ff, GgmlType::Q8_0);
    }
    w.to_bytes()
}

const GEMMA_CONTROL: [&str; 6] = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"];
const GEMMA_USER_DEFINED: [&str; 2] = ["\n", "  "];
/// Merged pieces, best score first (SentencePiece merges by score, not by rank).
const GEMMA_PIECES: [&str; 8] = ["▁t", "he", "▁the", "in", "▁a", "er", "an", "on"];

fn synthesize_gemma3(spec: &SynthSpec, hd: usize, window: usize) -> Vec<u8> {
    let mut rng = Rng(spec.seed);
    let mut tokens: Vec<String> = GEMMA_CONTROL.iter().map(|s| s.to_string()).collect();
    let mut types = vec![TOKEN_TYPE_CONTROL; tokens.len()];
    let mut scores = vec![-1000.0f32; tokens.len()];
    for s in GEMMA_USER_DEFINED {
        tokens.push(s.into());
        types.push(TOKEN_TYPE_USER_DEFINED);
        scores.push(-1000.0);
    }
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TOKEN_TYPE_BYTE);
        scores.push(0.0);
    }
    for (i, p) in GEMMA_PIECES.iter().enumerate() {
        tokens.push((*p).into());
        types.push(TOKEN_TYPE_NORMAL);
        scores.push(-(i as f32));
    }
    // Single characters: `▁` and printable ASCII; anything else takes byte fallback.
    for (i, c) in std::iter::once('▁').chain((33u8..127).map(char::from)).enumerate() {
        tokens.push(c.to_string());
        types.push(TOKEN_TYPE_NORMAL);
        scores.push(-100.0 - i as f32);
    }
    let n_vocab = tokens.len();
    let (qd, kvd) = (hd * spec.n_head, hd * spec.n_head_kv);
    let mut w = GgufWriter::new();
    let s = |v: &str| MetaValue::String(v.to_owned());
    let u32v = |v: usize| MetaValue::U32(v as u32);
    w.meta("general.architecture", s("gemma3"))
        .meta("general.name", s("sampo-synthetic-gemma3"))
        .meta("general.seed", MetaValue::U64(spec.seed))
        .meta("gemma3.context_length", u32v(spec.n_ctx))
        .meta("gemma3.embedding_length", u32v(spec.n_embd))
        .meta("gemma3.block_count", u32v(spec.n_layer))
        .meta("gemma3.feed_forward_length", u32v(spec.n_ff))
        .meta("gemma3.attention.head_count", u32v(spec.n_head))
        .meta("gemma3.attention.head_count_kv", u32v(spec.n_head_kv))
        .meta("gemma3.attention.key_length", u32v(hd))
        .meta("gemma3.attention.value_length", u32v(hd))
        .meta("gemma3.attention.sliding_window", u32v(window))
        .meta("gemma3.rope.freq_base", MetaValue::F32(1_000_000.0))
        .meta("gemma3.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-6))
        .meta("tokenizer.ggml.model", s("llama"))
        .meta("tokenizer.ggml.pre", s("default"))
        .meta("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()))
        .meta("tokenizer.ggml.scores", MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()))
        .meta("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(2))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(1))
        .meta("tokenizer.ggml.unknown_token_id", MetaValue::U32(3))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(true))
        .meta("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false));
    let mut mat = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType| {
        let scale = 1.0 / (cols as f32).sqrt() * 1.7;
        let vals: Vec<f32> = (0..rows * cols).map(|_| rng.next() * scale).collect();
        w.tensor(name, &[cols as u64, rows as u64], ty, quantize_row(ty, &vals));
    };
    // Gemma's embeddings are small and scaled up by sqrt(n_embd).
    mat(&mut w, "token_embd.weight", n_vocab, spec.n_embd, GgmlType::Q8_0);
    // Norm weights near 1 but not 1, so that each norm matters; from their own stream.
    let mut norm_rng = Rng(spec.seed ^ 0x5EED);
    let mut norm = |w: &mut GgufWriter, name: &str, n: usize| {
        let vals: Vec<f32> = (0..n).map(|_| 1.0 + 0.25 * norm_rng.next()).collect();
        w.tensor(name, &[n as u64], GgmlType::F32, quantize_row(GgmlType::F32, &vals));
    };
    norm(&mut w, "output_norm.weight", spec.n_embd);
    for i in 0..spec.n_layer {
        let p = |t: &str| format!("blk.{i}.{t}.weight");
        for t in ["attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"] {
            norm(&mut w, &p(t), spec.n_embd);
        }
        norm(&mut w, &p("attn_q_norm"), hd);
        norm(&mut w, &p("attn_k_norm"), hd);
        mat(&mut w, &p("attn_q"), qd, spec.n_embd, GgmlType::Q4_1);
        mat(&mut w, &p("attn_k"), kvd, spec.n_embd, GgmlType::Q4_1);
        mat(&mut w, &p("attn_v"), kvd, spec.n_embd, GgmlType::Q4_0);
        mat(&mut w, &p("attn_output"), spec.n_embd, qd, GgmlType::Q4_1);
        mat(&mut w, &p("ffn_gate"), spec.n_ff, spec.n_embd, GgmlType::Q4_1);
        mat(&mut w, &p("ffn_up"), spec.n_ff, spec.n_embd, GgmlType::Q4_1);
        mat(&mut w, &p("ffn_down"), spec.n_embd, spec.n_ff, GgmlType::F32);
    }
    w.to_bytes()
}
