//! Prompt prefixes already in a KV cache, kept for the requests that start with them.
//!
//! Chat requests to one model share their template's opening (a system prompt, the
//! role markers) and a client often resends a conversation with a turn appended. A
//! sequence whose prompt starts with a kept prompt's first `n` tokens starts from a
//! copy of their keys and values and prefills only the rest: the same bits as a
//! prefill from scratch (every position depends on the tokens up to it alone, the
//! determinism contract; `kernels/tests/determinism.rs` checks it), fewer rows.
//!
//! Bounded by bytes (a prompt's opening is sized before it is copied), least recently
//! used out first; CPU caches only (a device's cache is not the host's to copy). Only
//! prompts that ran to their end are kept, never a cancelled one (a stream whose task
//! was never announced): the prompts kept are the network's to see already (a task's
//! announcement carries its prompt), so the time a request saves, or the reuse counter,
//! tells a client nothing it could not read. A kept prefix is taken only by a job that
//! passed its checks, off the queue's lock.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use sampo_kernels::{BackendKind, Engine, Model, Sequence};

/// Shorter shared prefixes are not worth a copy.
pub(super) const MIN_REUSE: usize = 4;

/// Tokens of one prompt kept at most (its opening; longer prompts keep that much).
pub(super) const MAX_KEPT_TOKENS: usize = 1024;

struct Entry {
    /// The model the cache was computed with (weak: a kept prefix does not keep a
    /// model loaded, and a freed model's address is not reused while this lives).
    model: Weak<Model>,
    tokens: Vec<u32>,
    seq: Sequence,
    bytes: usize,
}

pub(super) struct PrefixCache {
    entries: VecDeque<Entry>,
    bytes: usize,
    cap: usize,
}

fn cached_here(engine: &Engine) -> bool {
    engine.backend().kind() == BackendKind::Cpu
}

fn same_model(e: &Entry, m: &Arc<Model>) -> bool {
    std::ptr::eq(e.model.as_ptr(), Arc::as_ptr(m))
}

impl PrefixCache {
    /// At most `cap` bytes of keys and values (0: keep nothing).
    pub(super) fn new(cap: usize) -> Self {
        Self { entries: VecDeque::new(), bytes: 0, cap }
    }

    /// A sequence holding the longest kept prefix of `prompt` — short of its last
    /// token, which a pass must feed for the next token's logits — and its length;
    /// `None` when no kept prompt shares [`MIN_REUSE`] tokens with it.
    pub(super) fn take(&mut self, engine: &Engine, prompt: &[u32]) -> Option<(Sequence, usize)> {
        if self.cap == 0 || !cached_here(engine) || prompt.len() <= MIN_REUSE {
            return None;
        }
        let limit = prompt.len() - 1;
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| same_model(e, &engine.model))
            .map(|(i, e)| (i, e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(limit)))
            .max_by_key(|&(i, n)| (n, i))?;
        if n < MIN_REUSE {
            return None;
        }
        let seq = self.entries[i].seq.fork_prefix(n)?;
        // Most recently used last.
        if let Some(e) = self.entries.remove(i) {
            self.entries.push_back(e);
        }
        Some((seq, n))
    }

    /// Keep `prompt`'s opening from `seq`, which holds it: up to [`MAX_KEPT_TOKENS`]
    /// and what the budget holds (sized before anything is copied), unless a kept
    /// prompt covers it already.
    pub(super) fn put(&mut self, engine: &Engine, prompt: &[u32], seq: &Sequence) {
        if self.cap == 0 || !cached_here(engine) {
            return;
        }
        let m = &engine.model;
        // Its keys and values, and the token itself.
        let per_token = m.hp.kv_bytes_per_token() + 4;
        let keep = prompt.len().min(MAX_KEPT_TOKENS).min(self.cap / per_token.max(1));
        if keep <= MIN_REUSE || keep > seq.pos {
            return;
        }
        let tokens = &prompt[..keep];
        if let Some(i) = self.entries.iter().position(|e| same_model(e, m) && e.tokens.starts_with(tokens)) {
            if let Some(e) = self.entries.remove(i) {
                self.entries.push_back(e);
            }
            return;
        }
        let Some(kept) = seq.fork_prefix(tokens.len()) else { return };
        // Exact capacities: within the size computed above.
        let bytes = kept.kv_bytes() + tokens.len() * 4;
        if bytes > self.cap {
            return;
        }
        // Kept prompts this one extends are covered by it; those of a dropped model
        // serve no one.
        let mut freed = 0;
        self.entries.retain(|e| {
            let covered = (same_model(e, m) && tokens.starts_with(&e.tokens)) || e.model.strong_count() == 0;
            if covered {
                freed += e.bytes;
            }
            !covered
        });
        self.bytes -= freed;
        while self.bytes + bytes > self.cap {
            let Some(e) = self.entries.pop_front() else { break };
            self.bytes -= e.bytes;
        }
        self.bytes += bytes;
        self.entries.push_back(Entry { model: Arc::downgrade(m), tokens: tokens.to_vec(), seq: kept, bytes });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sampo_kernels::synth::{SynthSpec, synthesize};
    use sampo_kernels::{BatchItem, CpuBackend};

    fn engine() -> Engine {
        let model = sampo_kernels::gguf::GgufFile::from_bytes(synthesize(&SynthSpec::default())).expect("gguf");
        let model = Arc::new(Model::from_gguf(model).expect("model"));
        Engine::new(model, Arc::new(CpuBackend::new(1).expect("cpu")))
    }

    fn prefilled(e: &Engine, prompt: &[u32]) -> Sequence {
        let mut seq = Sequence::new(&e.model);
        e.backend().forward(&e.model, &mut [BatchItem { seq: &mut seq, tokens: prompt }]).expect("forward");
        seq
    }

    #[test]
    fn the_cache_stays_within_its_bytes_and_drops_the_least_recently_used() {
        let e = engine();
        let prompt = |i: u32| -> Vec<u32> { (0..20).map(|t| 1 + (t * 7 + i * 31) % 200).collect() };
        let one = {
            let mut probe = PrefixCache::new(usize::MAX);
            probe.put(&e, &prompt(0), &prefilled(&e, &prompt(0)));
            probe.bytes
        };
        let mut cache = PrefixCache::new(2 * one + one / 2);
        for i in 0..5 {
            cache.put(&e, &prompt(i), &prefilled(&e, &prompt(i)));
            assert!(cache.bytes <= cache.cap, "{} of {}", cache.bytes, cache.cap);
        }
        assert_eq!(cache.entries.len(), 2);
        assert!(cache.take(&e, &prompt(0)).is_none(), "the oldest is gone");
        let (seq, n) = cache.take(&e, &prompt(4)).expect("the newest is kept");
        assert_eq!((n, seq.pos), (19, 19), "all but the last token");
        // A prompt that extends a kept one replaces it.
        let mut ext = prompt(4);
        ext.extend([5, 6]);
        cache.put(&e, &ext, &prefilled(&e, &ext));
        assert_eq!(cache.entries.back().map(|x| x.tokens.len()), Some(22));
        assert!(cache.entries.iter().all(|x| x.tokens != prompt(4)));
        assert!(cache.bytes <= cache.cap);
        // A prompt larger than the whole budget keeps the opening the budget holds.
        let long: Vec<u32> = (0..200).map(|t| 1 + t % 200).collect();
        cache.put(&e, &long, &prefilled(&e, &long));
        let kept = cache.entries.back().map_or(0, |x| x.tokens.len());
        assert!(kept > 20 && kept < long.len(), "kept {kept} tokens");
        assert!(cache.bytes <= cache.cap);
        let (_, n) = cache.take(&e, &long).expect("its opening");
        assert_eq!(n, kept);
        // A budget smaller than a few tokens keeps nothing.
        let mut tiny = PrefixCache::new(one / 10);
        tiny.put(&e, &long, &prefilled(&e, &long));
        assert!(tiny.entries.is_empty() && tiny.bytes == 0);
    }
}
