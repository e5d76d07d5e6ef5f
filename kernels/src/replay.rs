//! Verification by replay (`DESIGN.md`, trust model point 2). Outputs are
//! bit-deterministic, so a revealed output is checked by teacher-forcing prompt +
//! output through the model in a few batched passes: the logits after every position
//! are the bits generation had step by step, and with the task's seed the sampler must
//! pick exactly the revealed tokens and end exactly where the output ends.
//!
//! The output is attacker-supplied: whatever it holds (stop tokens, ids outside the
//! vocabulary, too many tokens) is a [`Divergence`], never an error or a panic. Errors
//! are left for what the task itself gets wrong, the same ones generation returns.

use std::fmt;
use std::time::Instant;

use crate::cpu::{BatchItem, Sequence};
use crate::model::ModelError;
use crate::sampling::{self, SamplingParams};
use crate::{Engine, KernelError};

/// Output tokens per teacher-forced pass: enough rows that the weights are read once
/// per many positions (what makes replay cheaper than decoding), few enough that the
/// logits of one pass stay small (64 rows of a 262k vocabulary are 64 MiB).
const CHUNK: usize = 64;

/// Where a revealed output first departs from what the model produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Divergence {
    /// Index into the output.
    pub position: usize,
    /// The output's token there; `None`: the output ended here.
    pub revealed: Option<u32>,
    /// The model's token there; `None`: generation would have stopped here (a stop
    /// token was sampled, or `max_tokens` was reached).
    pub expected: Option<u32>,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pos = self.position;
        match (self.expected, self.revealed) {
            (Some(e), Some(r)) => write!(f, "at output position {pos} the model gives token {e}, the output has {r}"),
            (Some(e), None) => write!(f, "the output ends at position {pos}, where the model gives token {e}"),
            (None, Some(r)) => write!(f, "at output position {pos} generation stops, the output has token {r}"),
            (None, None) => write!(f, "at output position {pos} both the model and the output stop"),
        }
    }
}

/// The verdict of a replay.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Replay {
    /// The first divergence; `None`: the output is exactly what generation produces.
    pub divergence: Option<Divergence>,
    /// Generation steps checked: the output's positions up to the divergence (included),
    /// plus the final stop when the output ends with one.
    pub positions: usize,
    /// Wall time of the replay, prompt prefill included.
    pub secs: f64,
}

impl Replay {
    pub fn is_valid(&self) -> bool {
        self.divergence.is_none()
    }
}

impl Engine {
    /// Check that `output` is what [`Engine::generate`] produces for `prompt` and `p`
    /// (seed included): the same tokens, ended the same way. Errors only for what
    /// generation also refuses (invalid parameters, empty prompt, context overflow,
    /// a prompt token outside the vocabulary) and backend failures. Stops at the first
    /// divergence; positions after it are not computed (beyond the current pass).
    pub fn replay(&self, prompt: &[u32], output: &[u32], p: &SamplingParams) -> Result<Replay, KernelError> {
        self.check(prompt, p)?;
        let t0 = Instant::now();
        let model = &*self.model;
        // Generation samples before it compares the length, so even max_tokens 0 yields
        // a token; mirror that exactly.
        let limit = (p.max_tokens as usize).max(1);
        // A stop token or an id outside the vocabulary diverges at its own position at
        // the latest: the logits after it are never needed, so it is never fed (which
        // for an out-of-vocabulary id would be an error, not a verdict).
        let diverges = |t: u32| t as usize >= model.hp.n_vocab || p.stop.contains(&t);
        let mut seq = Sequence::new(model);
        // `logits[s - base]` are the logits generation samples step `s` from.
        let mut logits = self.backend.forward(model, &mut [BatchItem { seq: &mut seq, tokens: prompt }])?;
        let mut base = 0;
        let mut step = 0;
        let divergence = loop {
            if step == limit {
                // Generation ends here by length, without sampling.
                break output.get(step).map(|&t| Divergence { position: step, revealed: Some(t), expected: None });
            }
            if step - base == logits.len() {
                // Feeding output[j] gives the logits of step j + 1. Here step >= 1 and
                // output[step - 1] matched, so the pass is never empty.
                let start = step - 1;
                let bad = output[step..].iter().position(|&t| diverges(t)).map_or(output.len(), |i| step + i);
                let end = (start + CHUNK).min(output.len()).min(limit - 1).min(bad);
                logits = self.backend.forward_all(model, &mut seq, &output[start..end])?;
                if logits.len() != end - start {
                    return Err(ModelError::Device(format!(
                        "the backend returned {} rows of logits for {} tokens",
                        logits.len(),
                        end - start
                    ))
                    .into());
                }
                base = step;
            }
            let id = sampling::sample(&logits[step - base], p, step as u64);
            let expected = (!p.stop.contains(&id)).then_some(id);
            let revealed = output.get(step).copied();
            if revealed != expected {
                break Some(Divergence { position: step, revealed, expected });
            }
            step += 1;
            if revealed.is_none() {
                // Both stopped: the output ends with generation's stop.
                break None;
            }
        };
        let positions = divergence.map_or(step, |d| d.position + 1);
        Ok(Replay { divergence, positions, secs: t0.elapsed().as_secs_f64() })
    }
}
