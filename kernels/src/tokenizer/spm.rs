//! SentencePiece-style tokenization (`tokenizer.ggml.model = "llama"`), as llama.cpp
//! does it (`llm_tokenizer_spm` and `tokenizer_st_partition`):
//!
//! 1. Special tokens are split out of the text first, longest string first, each
//!    at every non-overlapping occurrence from the left. User-defined tokens (Gemma's
//!    whitespace runs, `\n`, `\t`…) are always split out; control and unknown tokens
//!    only when special tokens are parsed (and never inside protected ranges).
//! 2. Each remaining piece gets a leading space if `add_space_prefix` is set and it
//!    is first or follows a special token; spaces become `▁` (U+2581).
//! 3. The piece starts as one symbol per character; the adjacent pair whose
//!    concatenation is a token of the highest score merges, the leftmost among equal
//!    scores, until no pair forms a token.
//! 4. A symbol that is not a token is emitted as its bytes (`<0xXX>` tokens).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::ops::Range;

use super::{TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_USER_DEFINED, TokenizerError};

/// Special-token strings of one byte length.
#[derive(Debug, Clone)]
struct LengthGroup {
    len: usize,
    /// Whether some string of the group starts with this byte (a cheap pre-filter).
    first: [bool; 256],
    /// String → (id, parsed only when special tokens are: control or unknown).
    ids: HashMap<Box<[u8]>, (u32, bool)>,
}

#[derive(Debug, Clone)]
pub(super) struct Spm {
    scores: Vec<f32>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
    /// Longest first, as llama.cpp sorts its special-token cache.
    groups: Vec<LengthGroup>,
}

/// A piece of the text after special tokens are split out.
enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

/// A symbol of a piece under merging: a byte range of the escaped piece, in a
/// doubly linked list of the live ones (a merged-away symbol is empty).
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Adjacent symbols whose concatenation is a token, as they were when queued.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the concatenation: a pair whose symbols changed since is stale.
    len: usize,
}

impl Ord for Bigram {
    /// Greatest first in `BinaryHeap`: the highest score, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl Spm {
    pub(super) fn new(
        tokens: &[String],
        types: &[i32],
        scores: Vec<f32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self, TokenizerError> {
        if scores.len() != tokens.len() {
            return Err(TokenizerError::Invalid(format!("{} scores for {} tokens", scores.len(), tokens.len())));
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(TokenizerError::Invalid(format!("token {i} has a score that is not finite")));
        }
        let mut byte_ids = [None; 256];
        for (i, (s, &t)) in tokens.iter().zip(types).enumerate() {
            if t == TOKEN_TYPE_BYTE
                && let Some(b) = parse_byte_token(s)
            {
                byte_ids[b as usize].get_or_insert(i as u32);
            }
        }
        let mut groups: Vec<LengthGroup> = Vec::new();
        for (i, (s, &t)) in tokens.iter().zip(types).enumerate() {
            let parse_only = t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_UNKNOWN;
            if s.is_empty() || !(parse_only || t == TOKEN_TYPE_USER_DEFINED) {
                continue;
            }
            let g = match groups.iter_mut().position(|g| g.len == s.len()) {
                Some(k) => &mut groups[k],
                None => {
                    groups.push(LengthGroup { len: s.len(), first: [false; 256], ids: HashMap::new() });
                    groups.last_mut().ok_or_else(|| TokenizerError::Invalid("special token groups".into()))?
                }
            };
            g.first[s.as_bytes()[0] as usize] = true;
            // Two tokens with one string: the lower id (llama.cpp leaves the order open).
            g.ids.entry(s.as_bytes().into()).or_insert((i as u32, parse_only));
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.len));
        Ok(Self { scores, byte_ids, unk, add_space_prefix, groups })
    }

    /// Encode `text`; control tokens are parsed when `parse_special`, except where they
    /// overlap a `protected` byte range.
    pub(super) fn encode(
        &self,
        ids: &HashMap<String, u32>,
        text: &str,
        parse_special: bool,
        protected: &[Range<usize>],
        out: &mut Vec<u32>,
    ) {
        let mut prev_special = true;
        let mut piece = String::new();
        for frag in self.partition(text, parse_special, protected) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(r) => {
                    piece.clear();
                    if self.add_space_prefix && prev_special {
                        piece.push('▁');
                    }
                    for c in text[r].chars() {
                        piece.push(if c == ' ' { '▁' } else { c });
                    }
                    self.merge(ids, &piece, out);
                    prev_special = false;
                }
            }
        }
    }

    /// Step 1: split special tokens out of `text`, longest strings first.
    fn partition(&self, text: &str, parse_special: bool, protected: &[Range<usize>]) -> Vec<Fragment> {
        let bytes = text.as_bytes();
        let shielded = |p: usize, len: usize| protected.iter().any(|r| p < r.end && r.start < p + len);
        let mut frags = if text.is_empty() { Vec::new() } else { vec![Fragment::Text(0..text.len())] };
        for g in &self.groups {
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Fragment::Text(r) = f else {
                    next.push(f);
                    continue;
                };
                let (mut start, mut i) = (r.start, r.start);
                while i + g.len <= r.end {
                    let found = if g.first[bytes[i] as usize] { g.ids.get(&bytes[i..i + g.len]) } else { None };
                    match found {
                        Some(&(id, parse_only)) if !(parse_only && (!parse_special || shielded(i, g.len))) => {
                            if start < i {
                                next.push(Fragment::Text(start..i));
                            }
                            next.push(Fragment::Token(id));
                            i += g.len;
                            start = i;
                        }
                        _ => i += 1,
                    }
                }
                if start < r.end {
                    next.push(Fragment::Text(start..r.end));
                }
            }
            frags = next;
        }
        frags
    }

    /// Steps 3 and 4 over one escaped piece. A heap of candidate pairs over a linked
    /// list of symbols: O(n log n) in the piece's length.
    fn merge(&self, ids: &HashMap<String, u32>, piece: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Symbol> = Vec::with_capacity(piece.len());
        for (start, c) in piece.char_indices() {
            let k = syms.len();
            syms.push(Symbol { start, end: start + c.len_utf8(), prev: k.checked_sub(1), next: None });
            if k > 0 {
                syms[k - 1].next = Some(k);
            }
        }
        let mut heap = BinaryHeap::new();
        for r in 1..syms.len() {
            self.push_bigram(ids, piece, &syms, r - 1, r, &mut heap);
        }
        while let Some(b) = heap.pop() {
            let (left, right) = (syms[b.left], syms[b.right]);
            // Stale unless both symbols are as they were: still adjacent, same lengths.
            if left.next != Some(b.right) || right.end - left.start != b.len || left.start == left.end {
                continue;
            }
            syms[b.left].end = right.end;
            syms[b.left].next = right.next;
            syms[b.right] = Symbol { start: right.start, end: right.start, prev: None, next: None };
            if let Some(n) = right.next {
                syms[n].prev = Some(b.left);
            }
            if let Some(p) = left.prev {
                self.push_bigram(ids, piece, &syms, p, b.left, &mut heap);
            }
            if let Some(n) = right.next {
                self.push_bigram(ids, piece, &syms, b.left, n, &mut heap);
            }
        }
        let mut at = (!syms.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = &piece[syms[i].start..syms[i].end];
            match ids.get(s) {
                Some(&id) => out.push(id),
                None => out.extend(s.bytes().map(|b| self.byte_token(ids, b))),
            }
            at = syms[i].next;
        }
    }

    fn push_bigram(
        &self,
        ids: &HashMap<String, u32>,
        piece: &str,
        syms: &[Symbol],
        left: usize,
        right: usize,
        heap: &mut BinaryHeap<Bigram>,
    ) {
        let (start, end) = (syms[left].start, syms[right].end);
        if let Some(&id) = ids.get(&piece[start..end]) {
            heap.push(Bigram { score: self.scores[id as usize], left, right, len: end - start });
        }
    }

    /// The `<0xXX>` token of a byte; else the byte as a one-character token; else the
    /// unknown token (a vocabulary without byte fallback cannot do better).
    fn byte_token(&self, ids: &HashMap<String, u32>, b: u8) -> u32 {
        self.byte_ids[b as usize]
            .or_else(|| if b.is_ascii() { ids.get(&(b as char).to_string()).copied() } else { None })
            .or(self.unk)
            .unwrap_or(0)
    }

    pub(super) fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }
}

/// The byte of a `<0xXX>` token.
pub(super) fn parse_byte_token(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The bytes a normal SentencePiece token stands for: its text with `▁` as a space.
pub(super) fn unescape(s: &str) -> Vec<u8> {
    s.replace('▁', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::super::Tokenizer;
    use crate::gguf::GgufFile;
    use crate::synth::{SynthSpec, synthesize};

    fn synthetic() -> Tokenizer {
        let f = GgufFile::from_bytes(synthesize(&SynthSpec::gemma3())).expect("gguf");
        Tokenizer::from_gguf(&f).expect("tokenizer")
    }

    /// llama.cpp's merge loop without the heap: rescan for the best pair each time.
    fn rescan(t: &Tokenizer, piece: &str) -> Vec<u32> {
        let spm = t.spm.as_ref().expect("spm");
        let mut syms: Vec<String> = piece.chars().map(String::from).collect();
        loop {
            let mut best: Option<(f32, usize)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&id) = t.ids.get(&format!("{}{}", syms[i], syms[i + 1])) {
                    let score = spm.scores[id as usize];
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let right = syms.remove(i + 1);
            syms[i].push_str(&right);
        }
        let mut out = Vec::new();
        for s in syms {
            match t.ids.get(&s) {
                Some(&id) => out.push(id),
                None => out.extend(s.bytes().map(|b| spm.byte_token(&t.ids, b))),
            }
        }
        out
    }

    #[test]
    fn merges_by_score_with_byte_fallback_and_user_defined_splits() {
        let t = synthetic();
        let id = |s: &str| t.token_id(s).expect("token");
        assert_eq!(t.encode("the", false), vec![id("t"), id("he")]);
        assert_eq!(t.encode(" the", false), vec![id("▁the")]);
        // `\n` and a double space are user-defined: split out even without parse_special.
        assert_eq!(t.encode("a\n  b", false), vec![id("a"), id("\n"), id("  "), id("b")]);
        assert_eq!(t.encode("é", false), vec![id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(t.encode("<bos>x", true), vec![id("<bos>"), id("x")]);
        assert_eq!(t.decode(&t.encode("<bos>x", false)).expect("decode"), "<bos>x");
        assert_eq!(t.encode_prompt("x"), vec![id("<bos>"), id("x")]);
    }

    proptest::proptest! {
        #[test]
        fn heap_merge_equals_rescan(s in "[ the anro\u{e9}\u{4e2d}]{0,60}") {
            let t = synthetic();
            let escaped = s.replace(' ', "▁");
            let mut heap = Vec::new();
            t.spm.as_ref().expect("spm").merge(&t.ids, &escaped, &mut heap);
            proptest::prop_assert_eq!(heap, rescan(&t, &escaped));
            proptest::prop_assert_eq!(t.decode(&t.encode(&s, true)).expect("decode"), s);
        }
    }
}
