//! Tokenizers built from a GGUF file's `tokenizer.ggml.*` metadata: GPT-2-style
//! byte-level BPE (`tokenizer.ggml.model = "gpt2"`, below) and SentencePiece
//! (`"llama"`, in [`spm`]).
//!
//! BPE pre-tokenization follows llama.cpp's `smollm` rules: first every numeric character
//! is split off on its own (`\p{N}`), then each piece is split by the GPT-2 pattern
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
//! Special tokens (control and user-defined types) found in the text are emitted as
//! themselves when `parse_special` is set.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use unicode_general_category::{GeneralCategory, get_general_category};

use crate::gguf::{GgufError, GgufFile};

mod spm;

/// llama.cpp token types.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
pub const TOKEN_TYPE_UNUSED: i32 = 5;
pub const TOKEN_TYPE_BYTE: i32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model `{0}` (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("tokenizer metadata: {0}")]
    Invalid(String),
    #[error("token id {0} is outside the vocabulary")]
    UnknownId(u32),
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    /// (left, right) → (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    /// Special tokens, longest first, for matching in text (SentencePiece: those that
    /// only `parse_special` makes special, control and unknown tokens).
    specials: Vec<(String, u32)>,
    /// SentencePiece's own state; `None` for BPE.
    spm: Option<Box<spm::Spm>>,
    /// Whether a prompt starts with `bos` (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Vec<u32>,
    pub chat_template: Option<String>,
    /// The most bytes of text one token can stand for (specials included): a text of
    /// `n` bytes takes at least `n / max_token_bytes` tokens, known before encoding it.
    max_token_bytes: usize,
}

/// GPT-2's reversible map from bytes to printable characters.
pub fn byte_chars() -> [char; 256] {
    bytes_to_unicode()
}

fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    map
}

fn is_letter(c: char) -> bool {
    use GeneralCategory::*;
    matches!(
        get_general_category(c),
        UppercaseLetter | LowercaseLetter | TitlecaseLetter | ModifierLetter | OtherLetter
    )
}

fn is_number(c: char) -> bool {
    use GeneralCategory::*;
    matches!(get_general_category(c), DecimalNumber | LetterNumber | OtherNumber)
}

/// Split `text` into pre-tokens per the `smollm` rules (byte offsets).
pub fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    // Pass 1: every numeric char is its own piece.
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if is_number(c) {
            if start < i {
                gpt2_split(&text[start..i], &mut out);
            }
            out.push(&text[i..i + c.len_utf8()]);
            start = i + c.len_utf8();
        }
    }
    if start < text.len() {
        gpt2_split(&text[start..], &mut out);
    }
    out
}

fn gpt2_split<'a>(s: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| if i < n { chars[i].0 } else { s.len() };
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // Contractions.
        if c == '\'' && i + 1 < n {
            let c1 = chars[i + 1].1;
            if matches!(c1, 's' | 't' | 'm' | 'd') {
                out.push(&s[at(i)..at(i + 2)]);
                i += 2;
                continue;
            }
            if i + 2 < n {
                let c2 = chars[i + 2].1;
                if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    out.push(&s[at(i)..at(i + 3)]);
                    i += 3;
                    continue;
                }
            }
        }
        // Optional leading space followed by a class run.
        let (lead, j) = if c == ' ' && i + 1 < n { (1, i + 1) } else { (0, i) };
        let cj = chars[j].1;
        if lead == 1 || j == i {
            let class: Option<fn(char) -> bool> = if is_letter(cj) {
                Some(is_letter)
            } else if is_number(cj) {
                Some(is_number)
            } else if !cj.is_whitespace() {
                Some(|c: char| !c.is_whitespace() && !is_letter(c) && !is_number(c))
            } else {
                None
            };
            if let Some(class) = class {
                let mut k = j;
                while k < n && class(chars[k].1) {
                    k += 1;
                }
                out.push(&s[at(i)..at(k)]);
                i = k;
                continue;
            }
        }
        // Whitespace: `\s+(?!\S)` then `\s+`.
        let mut k = i;
        while k < n && chars[k].1.is_whitespace() {
            k += 1;
        }
        if k < n && k - i > 1 {
            // Followed by non-space: leave the last whitespace char for the next piece.
            k -= 1;
        }
        out.push(&s[at(i)..at(k)]);
        i = k;
    }
}

/// A symbol of a word under BPE, in a doubly linked list of the live ones.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
}

/// An adjacent pair that could merge, as it was when queued (it may have gone stale).
#[derive(Debug)]
struct Candidate {
    rank: u32,
    /// Index of the left symbol: the pair's position in the word.
    left: usize,
    right: usize,
    left_id: u32,
    right_id: u32,
    merged: u32,
}

impl Ord for Candidate {
    /// Greatest first in `BinaryHeap`, so reversed: lowest rank, then leftmost, pops
    /// first, the pair a full rescan of the word would pick.
    fn cmp(&self, other: &Self) -> Ordering {
        #[cfg(test)]
        stats::add(|s| s.comparisons += 1);
        (other.rank, other.left).cmp(&(self.rank, self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        (self.rank, self.left) == (other.rank, other.left)
    }
}

impl Eq for Candidate {}

/// First occurrence of `tok` in `text` at or after byte `from`.
fn find_from(text: &str, from: usize, tok: &str) -> Option<usize> {
    let found = text[from..].find(tok).map(|p| from + p);
    #[cfg(test)]
    stats::add(|s| s.scanned += found.map_or(text.len(), |p| p + tok.len()) - from);
    found
}

/// Work counters of the encoder, per thread, for tests that bound it by counting.
#[cfg(test)]
mod stats {
    use std::cell::Cell;

    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct Stats {
        /// Heap pushes (the initial heapify counts one per entry) and pops.
        pub(super) heap_ops: u64,
        /// Candidate key comparisons, inside the heap.
        pub(super) comparisons: u64,
        /// Bytes looked at while searching for special tokens.
        pub(super) scanned: usize,
    }

    thread_local! {
        static STATS: Cell<Stats> = Cell::new(Stats::default());
    }

    pub(super) fn add(f: impl FnOnce(&mut Stats)) {
        STATS.with(|c| {
            let mut s = c.get();
            f(&mut s);
            c.set(s);
        });
    }

    /// The counters since the last call, reset.
    pub(super) fn take() -> Stats {
        STATS.with(|c| c.replace(Stats::default()))
    }
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TokenizerError> {
        let model = f.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" && model != "llama" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let tokens: Vec<String> = f
            .get_array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| TokenizerError::Invalid("tokenizer.ggml.tokens holds a non-string".into()))?;
        let types: Vec<i32> = match f.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .ok_or_else(|| TokenizerError::Invalid("token_type is not an array".into()))?
                .iter()
                .map(|t| t.as_i64().map(|x| x as i32))
                .collect::<Option<_>>()
                .ok_or_else(|| TokenizerError::Invalid("token_type holds a non-integer".into()))?,
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::Invalid(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        let merges: Vec<String> = match f.get("tokenizer.ggml.merges") {
            Some(v) => v
                .as_array()
                .ok_or_else(|| TokenizerError::Invalid("merges is not an array".into()))?
                .iter()
                .map(|m| m.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| TokenizerError::Invalid("merges holds a non-string".into()))?,
            None => Vec::new(),
        };
        let id = |key: &str| f.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
        let flag = |key: &str| match f.get(key) {
            Some(crate::gguf::MetaValue::Bool(b)) => Some(*b),
            _ => None,
        };
        let is_spm = model == "llama";
        let mut t = if is_spm {
            let scores: Vec<f32> = f
                .get_array("tokenizer.ggml.scores")?
                .iter()
                .map(|v| match v {
                    crate::gguf::MetaValue::F32(x) => Some(*x),
                    _ => None,
                })
                .collect::<Option<_>>()
                .ok_or_else(|| TokenizerError::Invalid("tokenizer.ggml.scores holds a non-f32".into()))?;
            let unk = id("tokenizer.ggml.unknown_token_id").filter(|&i| (i as usize) < tokens.len());
            // llama.cpp's defaults for SentencePiece when the file does not say.
            let space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            Self::new_spm(tokens, types, scores, unk, space_prefix)?
        } else {
            Self::new(tokens, types, &merges)?
        };
        t.add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(is_spm);
        t.bos = id("tokenizer.ggml.bos_token_id").filter(|&i| (i as usize) < t.tokens.len());
        t.eos = id("tokenizer.ggml.eos_token_id").filter(|&i| (i as usize) < t.tokens.len());
        t.eot = t.eos.into_iter().collect();
        // End-of-turn tokens that also end generation, as llama.cpp's EOG set.
        for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"] {
            if let Some(&i) = t.ids.get(name)
                && !t.eot.contains(&i)
            {
                t.eot.push(i);
            }
        }
        t.chat_template = f.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_owned);
        Ok(t)
    }

    pub fn new(tokens: Vec<String>, types: Vec<i32>, merges: &[String]) -> Result<Self, TokenizerError> {
        if tokens.is_empty() || tokens.len() > u32::MAX as usize / 2 {
            return Err(TokenizerError::Invalid(format!("vocabulary of {} tokens", tokens.len())));
        }
        let ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, s)| (s.clone(), i as u32)).collect();
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else {
                return Err(TokenizerError::Invalid(format!("merge {rank} `{m}` has no space")));
            };
            let (Some(&ia), Some(&ib), Some(&im)) = (ids.get(a), ids.get(b), ids.get(&format!("{a}{b}"))) else {
                continue; // a merge whose parts aren't tokens can never fire
            };
            merge_map.entry((ia, ib)).or_insert((rank as u32, im));
        }
        let byte_to_char = bytes_to_unicode();
        let char_to_byte = byte_to_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (s, t))| (**t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED) && !s.is_empty())
            .map(|(i, (s, _))| (s.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        // Byte-level tokens: one character per byte; specials stand for their text.
        let max_token_bytes = tokens.iter().map(|s| s.chars().count().max(s.len().min(1))).max().unwrap_or(1).max(1);
        let max_token_bytes = max_token_bytes.max(specials.first().map_or(1, |s| s.0.len()));
        Ok(Self {
            tokens,
            types,
            ids,
            merges: merge_map,
            byte_to_char,
            char_to_byte,
            specials,
            spm: None,
            add_bos: false,
            bos: None,
            eos: None,
            eot: Vec::new(),
            chat_template: None,
            max_token_bytes,
        })
    }

    /// A SentencePiece tokenizer: `scores` rank merges (higher first), `<0xXX>` byte
    /// tokens are the fallback, `add_space_prefix` puts a space before the text.
    pub fn new_spm(
        tokens: Vec<String>,
        types: Vec<i32>,
        scores: Vec<f32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self, TokenizerError> {
        if tokens.is_empty() || tokens.len() > u32::MAX as usize / 2 {
            return Err(TokenizerError::Invalid(format!("vocabulary of {} tokens", tokens.len())));
        }
        if types.len() != tokens.len() {
            return Err(TokenizerError::Invalid(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        let spm = spm::Spm::new(&tokens, &types, scores, unk, add_space_prefix)?;
        // Later ids win for repeated strings, as in llama.cpp's map (and `new`).
        let ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, s)| (s.clone(), i as u32)).collect();
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (s, t))| (**t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_UNKNOWN) && !s.is_empty())
            .map(|(i, (s, _))| (s.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        // A token's text is never shorter than the bytes it stands for (`▁` and
        // `<0xXX>` are longer), so the longest text bounds them; plus a space prefix.
        let max_token_bytes = tokens.iter().map(String::len).max().unwrap_or(1).max(1) + 1;
        Ok(Self {
            tokens,
            types,
            ids,
            merges: HashMap::new(),
            byte_to_char: ['\0'; 256],
            char_to_byte: HashMap::new(),
            specials,
            spm: Some(Box::new(spm)),
            add_bos: false,
            bos: None,
            eos: None,
            eot: Vec::new(),
            chat_template: None,
            max_token_bytes,
        })
    }

    /// Encode a prompt as the model expects it: `bos` first when the file asks for it
    /// (`add_bos`), then `text` with special tokens parsed.
    pub fn encode_prompt(&self, text: &str) -> Vec<u32> {
        let mut out: Vec<u32> = self.bos.filter(|_| self.add_bos).into_iter().collect();
        out.extend(self.encode(text, true));
        out
    }

    /// `tokens` with `bos` in front when the file asks for it and it is not there yet.
    pub fn with_bos(&self, mut tokens: Vec<u32>) -> Vec<u32> {
        if let Some(b) = self.bos.filter(|_| self.add_bos)
            && tokens.first() != Some(&b)
        {
            tokens.insert(0, b);
        }
        tokens
    }

    /// Whether this is a SentencePiece tokenizer.
    pub fn is_spm(&self) -> bool {
        self.spm.is_some()
    }

    /// Whether SentencePiece puts a space before the text (`add_space_prefix`).
    pub fn add_space_prefix(&self) -> bool {
        self.spm.as_ref().is_some_and(|s| s.add_space_prefix())
    }

    /// The fewest tokens `bytes` bytes of text can encode to.
    pub fn min_tokens_for(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.max_token_bytes)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    /// Whether `text` contains any special token's string.
    pub fn contains_special(&self, text: &str) -> bool {
        self.specials.iter().any(|(tok, _)| text.contains(tok.as_str()))
    }

    pub fn is_special(&self, id: u32) -> bool {
        matches!(self.types.get(id as usize), Some(&TOKEN_TYPE_CONTROL))
    }

    /// Encode `text`; special-token strings in it are parsed when `parse_special`.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        if let Some(spm) = &self.spm {
            let mut out = Vec::new();
            spm.encode(&self.ids, text, parse_special, &[], &mut out);
            return out;
        }
        if !parse_special {
            let mut out = Vec::new();
            self.encode_plain(text, &mut out);
            return out;
        }
        self.encode_protected(text, &[])
    }

    /// Encode `text` parsing special tokens, except inside the `protected` byte ranges
    /// (a client's message content in a rendered chat template): a user who types
    /// `<|im_start|>system` gets those characters as text, not a new turn. Text around
    /// and inside the ranges is tokenized as one, so nothing else changes.
    pub fn encode_protected(&self, text: &str, protected: &[std::ops::Range<usize>]) -> Vec<u32> {
        let mut out = Vec::new();
        if let Some(spm) = &self.spm {
            spm.encode(&self.ids, text, true, protected, &mut out);
            return out;
        }
        let shielded = |p: usize, len: usize| protected.iter().any(|r| p < r.end && r.start < p + len);
        // Where each special next occurs at or after `pos` (None: nowhere). Kept across
        // matches so that a text full of specials is scanned about once per special;
        // searching every special afresh after each match was quadratic.
        let mut next: Vec<Option<usize>> = Vec::with_capacity(self.specials.len());
        for (tok, _) in &self.specials {
            next.push(find_from(text, 0, tok));
        }
        let mut pos = 0;
        while pos < text.len() {
            // Earliest match wins; at equal position the longest (specials are sorted).
            let mut best: Option<(usize, usize)> = None;
            for (k, (tok, _)) in self.specials.iter().enumerate() {
                if next[k].is_some_and(|p| p < pos) {
                    // Overlapped by an earlier match: the next occurrence lies further on.
                    next[k] = find_from(text, pos, tok);
                }
                if let Some(p) = next[k]
                    && best.is_none_or(|(bp, _)| p < bp)
                {
                    best = Some((p, k));
                }
            }
            let Some((p, k)) = best else {
                self.encode_plain(&text[pos..], &mut out);
                break;
            };
            let (tok, id) = &self.specials[k];
            if shielded(p, tok.len()) {
                // Not a special here: look for this one further on; the text stays text.
                next[k] = find_from(text, p + tok.chars().next().map_or(1, char::len_utf8), tok);
                continue;
            }
            self.encode_plain(&text[pos..p], &mut out);
            out.push(*id);
            pos = p + tok.len();
        }
        out
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        for piece in pre_tokenize(text) {
            self.bpe(piece, out);
        }
    }

    /// BPE over one pre-token: repeatedly merge the adjacent pair of lowest merge rank,
    /// the leftmost among equal ranks. A heap of candidate pairs over a linked list of
    /// symbols does this in O(n log n); rescanning the word for every merge was
    /// quadratic, minutes of CPU for one long word.
    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        let mapped: String = piece.bytes().map(|b| self.byte_to_char[b as usize]).collect();
        if let Some(&id) = self.ids.get(&mapped) {
            out.push(id);
            return;
        }
        // Symbols start as single byte-characters; index i is the word's byte i, so
        // index order is text order whatever has been merged.
        let n = piece.len();
        let mut syms: Vec<Symbol> = Vec::with_capacity(n);
        for (i, c) in mapped.chars().enumerate() {
            let mut buf = [0u8; 4];
            // A byte with no token: nothing sensible to emit but the unknown token 0.
            let id = self.ids.get(c.encode_utf8(&mut buf) as &str).copied().unwrap_or(0);
            syms.push(Symbol { id, prev: i.checked_sub(1), next: Some(i + 1).filter(|&j| j < n) });
        }
        let initial: Vec<Candidate> = (1..syms.len()).filter_map(|r| self.candidate(&syms, r - 1, r)).collect();
        #[cfg(test)]
        stats::add(|s| s.heap_ops += initial.len() as u64);
        let mut heap = BinaryHeap::from(initial);
        while let Some(c) = heap.pop() {
            #[cfg(test)]
            stats::add(|s| s.heap_ops += 1);
            // Stale unless the pair is still adjacent with the same ids (then its rank and
            // result are the current ones). A merged-away symbol has no `next`.
            let left = syms[c.left];
            if left.next != Some(c.right) || left.id != c.left_id || syms[c.right].id != c.right_id {
                continue;
            }
            let after = syms[c.right].next;
            syms[c.left] = Symbol { id: c.merged, prev: left.prev, next: after };
            // Unlinked, so every queued pair that names it reads as stale.
            syms[c.right].prev = None;
            syms[c.right].next = None;
            if let Some(a) = after {
                syms[a].prev = Some(c.left);
            }
            // The merged symbol forms new pairs with both neighbours.
            for (l, r) in [left.prev.map(|p| (p, c.left)), after.map(|a| (c.left, a))].into_iter().flatten() {
                if let Some(cand) = self.candidate(&syms, l, r) {
                    #[cfg(test)]
                    stats::add(|s| s.heap_ops += 1);
                    heap.push(cand);
                }
            }
        }
        let mut at = (n > 0).then_some(0);
        while let Some(i) = at {
            out.push(syms[i].id);
            at = syms[i].next;
        }
    }

    /// The merge of the adjacent symbols `left` and `right`, if there is one.
    fn candidate(&self, syms: &[Symbol], left: usize, right: usize) -> Option<Candidate> {
        let (left_id, right_id) = (syms[left].id, syms[right].id);
        let &(rank, merged) = self.merges.get(&(left_id, right_id))?;
        Some(Candidate { rank, left, right, left_id, right_id, merged })
    }

    /// The raw bytes a token stands for (special tokens: their text).
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>, TokenizerError> {
        let s = self.tokens.get(id as usize).ok_or(TokenizerError::UnknownId(id))?;
        let ty = self.types[id as usize];
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            return Ok(s.as_bytes().to_vec());
        }
        if self.spm.is_some() {
            // As llama.cpp's `token_to_piece` for SentencePiece.
            return Ok(match ty {
                TOKEN_TYPE_BYTE => spm::parse_byte_token(s).map_or_else(|| s.as_bytes().to_vec(), |b| vec![b]),
                TOKEN_TYPE_UNKNOWN => s.as_bytes().to_vec(),
                TOKEN_TYPE_UNUSED => Vec::new(),
                _ => spm::unescape(s),
            });
        }
        Ok(s.chars()
            .flat_map(|c| match self.char_to_byte.get(&c) {
                Some(&b) => vec![b],
                None => c.to_string().into_bytes(),
            })
            .collect())
    }

    /// Decode a whole sequence (lossy only if the bytes are not UTF-8 as a whole).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.token_bytes(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Turns a stream of tokens into text without ever emitting broken UTF-8: bytes of
/// a character split across tokens are held until the character is complete.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed one token; returns the text that is now complete.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.pending.extend(tok.token_bytes(id)?);
        Ok(self.take_valid())
    }

    fn take_valid(&mut self) -> String {
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_owned();
                self.pending.clear();
                s
            }
            Err(e) => {
                let valid = e.valid_up_to();
                let mut out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                match e.error_len() {
                    // An invalid sequence (not just an unfinished one): replace it and go on.
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        self.pending.drain(..valid + bad);
                        out.push_str(&self.take_valid());
                    }
                    None => {
                        self.pending.drain(..valid);
                    }
                }
                out
            }
        }
    }

    /// End of stream: whatever is left, with replacement characters for a torn tail.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizer_rules() {
        assert_eq!(pre_tokenize("Hello world!"), vec!["Hello", " world", "!"]);
        assert_eq!(pre_tokenize("I'm you're"), vec!["I", "'m", " you", "'re"]);
        assert_eq!(pre_tokenize("a  b"), vec!["a", " ", " b"]);
        assert_eq!(pre_tokenize("x\n\n\ny"), vec!["x", "\n\n", "\n", "y"]);
        assert_eq!(pre_tokenize("2026 x"), vec!["2", "0", "2", "6", " x"]);
        assert_eq!(pre_tokenize(" -42"), vec![" -", "4", "2"]);
        assert_eq!(pre_tokenize("end  "), vec!["end", "  "]);
    }

    fn byte_tokenizer() -> Tokenizer {
        let map = bytes_to_unicode();
        let mut tokens: Vec<String> = map.iter().map(|c| c.to_string()).collect();
        let mut types = vec![TOKEN_TYPE_NORMAL; 256];
        tokens.push("<|im_start|>".into());
        types.push(TOKEN_TYPE_CONTROL);
        Tokenizer::new(tokens, types, &[]).expect("tokenizer")
    }

    #[test]
    fn stream_decoder_holds_split_characters() {
        let t = byte_tokenizer();
        let ids = t.encode("é€", false); // 2 + 3 bytes, one token each byte
        assert_eq!(ids.len(), 5);
        let mut d = StreamDecoder::new();
        let pieces: Vec<String> = ids.iter().map(|&i| d.push(&t, i).expect("push")).collect();
        assert_eq!(pieces, vec!["", "é", "", "", "€"]);
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn specials_parsed_only_when_asked() {
        let t = byte_tokenizer();
        assert_eq!(t.encode("<|im_start|>a", true), vec![256, b'a' as u32]);
        assert_eq!(t.encode("<|im_start|>a", false).len(), 13);
        assert!(matches!(t.token_bytes(9999), Err(TokenizerError::UnknownId(9999))));
    }

    /// The real SmolLM2 tokenizer when its file is present, else the synthetic model's.
    fn test_tokenizer() -> (Tokenizer, bool) {
        let dir = std::env::var_os("SAMPO_MODEL_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
        let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        if path.exists() {
            let f = GgufFile::open(&path).expect("open real model");
            (Tokenizer::from_gguf(&f).expect("real tokenizer"), true)
        } else {
            let bytes = crate::synth::synthesize(&crate::synth::SynthSpec::default());
            let f = GgufFile::from_bytes(bytes).expect("synthetic gguf");
            (Tokenizer::from_gguf(&f).expect("synthetic tokenizer"), false)
        }
    }

    /// Deterministic pseudo-random ASCII letters (splitmix64).
    fn random_letters(n: usize, seed: u64) -> String {
        const L: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                L[((z ^ (z >> 31)) % L.len() as u64) as usize] as char
            })
            .collect()
    }

    /// Mixed text of about `n` bytes: words, numbers, punctuation, whitespace, UTF-8, emoji.
    fn mixed_prompt(n: usize) -> String {
        let unit = "The quick brown fox, 2026 jumps! Über café — naïve 中文 😀👍🏽 x\n\n  \t don't (a+b)*c=42; ";
        let mut s = String::with_capacity(n + unit.len());
        while s.len() < n {
            s.push_str(unit);
        }
        s
    }

    fn real_or_synthetic() -> &'static Tokenizer {
        static T: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        T.get_or_init(|| {
            let (t, real) = test_tokenizer();
            eprintln!("tokenizer tests use the {} tokenizer", if real { "real SmolLM2" } else { "synthetic" });
            t
        })
    }

    /// The encoder as it was before the heap merge and the special-token cache, kept
    /// verbatim (quadratic) as the reference the fast one must equal on every input.
    mod reference {
        use super::super::*;

        pub(super) fn encode(t: &Tokenizer, text: &str, parse_special: bool) -> Vec<u32> {
            let mut out = Vec::new();
            let mut rest = text;
            while !rest.is_empty() {
                let next = if parse_special { find_special(t, rest) } else { None };
                match next {
                    Some((pos, len, id)) => {
                        encode_plain(t, &rest[..pos], &mut out);
                        out.push(id);
                        rest = &rest[pos + len..];
                    }
                    None => {
                        encode_plain(t, rest, &mut out);
                        break;
                    }
                }
            }
            out
        }

        fn find_special(t: &Tokenizer, s: &str) -> Option<(usize, usize, u32)> {
            let mut best: Option<(usize, usize, u32)> = None;
            for (tok, id) in &t.specials {
                if let Some(p) = s.find(tok.as_str())
                    && best.is_none_or(|(bp, _, _)| p < bp)
                {
                    best = Some((p, tok.len(), *id));
                }
            }
            best
        }

        fn encode_plain(t: &Tokenizer, text: &str, out: &mut Vec<u32>) {
            for piece in pre_tokenize(text) {
                bpe(t, piece, out);
            }
        }

        fn bpe(t: &Tokenizer, piece: &str, out: &mut Vec<u32>) {
            let mapped: String = piece.bytes().map(|b| t.byte_to_char[b as usize]).collect();
            if let Some(&id) = t.ids.get(&mapped) {
                out.push(id);
                return;
            }
            let mut syms: Vec<u32> = Vec::with_capacity(mapped.len());
            for c in mapped.chars() {
                let mut buf = [0u8; 4];
                match t.ids.get(c.encode_utf8(&mut buf) as &str) {
                    Some(&id) => syms.push(id),
                    None => syms.push(0),
                }
            }
            loop {
                let mut best: Option<(u32, usize, u32)> = None;
                for i in 0..syms.len().saturating_sub(1) {
                    if let Some(&(rank, merged)) = t.merges.get(&(syms[i], syms[i + 1]))
                        && best.is_none_or(|(r, _, _)| rank < r)
                    {
                        best = Some((rank, i, merged));
                    }
                }
                let Some((_, i, merged)) = best else { break };
                syms[i] = merged;
                syms.remove(i + 1);
            }
            out.extend(syms);
        }
    }

    /// Both encoders, both special modes, must agree.
    fn assert_same_as_reference(t: &Tokenizer, text: &str) {
        for special in [false, true] {
            assert_eq!(
                t.encode(text, special),
                reference::encode(t, text, special),
                "parse_special {special}, text {text:?}"
            );
        }
    }

    const ALPHABET: &[char] = &[
        'a', 'b', 'e', 'h', 'n', 'r', 't', 'A', 'Z', '0', '7', '9', ' ', ' ', ',', '.', '!', '?', '\'', '"', '-', '_',
        '(', '<', '|', '>', '\n', '\t', '\r', '\u{a0}', '\u{3000}', 'é', 'ß', 'ñ', 'Ж', '中', '文', 'ا', '½', 'Ⅻ', '٣',
        '😀', '👍', '🏽', '🇫', '🇮', '\u{200d}', '\u{301}',
    ];

    /// One piece of a test string: random characters, long runs, repeated patterns, words.
    /// Runs stay under ~1000 bytes because the reference is quadratic; the long inputs
    /// have their own test.
    fn segment() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let chars = || prop::sample::select(ALPHABET);
        let letters = prop::sample::select(('a'..='z').chain('A'..='Z').collect::<Vec<char>>());
        prop_oneof![
            prop::collection::vec(chars(), 0..40).prop_map(|v| v.into_iter().collect()),
            "\\PC{0,30}",
            (chars(), 1..600usize).prop_map(|(c, n)| c.to_string().repeat(n)),
            (prop::collection::vec(chars(), 1..5), 1..150usize)
                .prop_map(|(p, n)| p.into_iter().collect::<String>().repeat(n)),
            prop::collection::vec(letters, 1..400).prop_map(|v| v.into_iter().collect()),
            prop::sample::select(vec![
                "<|im_start|>",
                "<|im_end|>",
                "<|endoftext|>",
                "<|im_",
                "'s",
                "'re",
                "'ll",
                " don't",
                "Hello",
                " world",
                "the",
                "ing",
                "  ",
                " \n ",
                "ababababab",
                "aaaaaaaaaaaaaaaa",
            ])
            .prop_map(String::from),
        ]
    }

    proptest::proptest! {
        // PROPTEST_CASES raises the count for a longer hunt by hand.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
        ))]

        #[test]
        fn heap_bpe_equals_rescan_bpe(segs in proptest::collection::vec(segment(), 1..10)) {
            let t = real_or_synthetic();
            let text = segs.concat();
            for special in [false, true] {
                proptest::prop_assert_eq!(t.encode(&text, special), reference::encode(t, &text, special));
            }
        }
    }

    #[test]
    fn heap_bpe_equals_rescan_bpe_on_every_vocabulary_entry() {
        let t = real_or_synthetic();
        let texts: Vec<String> = (0..t.vocab_size() as u32)
            .filter(|&id| t.types[id as usize] == TOKEN_TYPE_NORMAL)
            .filter_map(|id| String::from_utf8(t.token_bytes(id).expect("token")).ok())
            .collect();
        for (i, text) in texts.iter().enumerate() {
            assert_same_as_reference(t, text);
            // Neighbours glued together make merges across the old token boundary.
            let next = &texts[(i + 1) % texts.len()];
            assert_same_as_reference(t, &format!("{text}{next}{text}"));
        }
    }

    #[test]
    fn heap_bpe_equals_rescan_bpe_on_long_inputs() {
        let t = real_or_synthetic();
        for text in [
            "a".repeat(4096),
            random_letters(4096, 1),
            "ab".repeat(2048),
            "abc".repeat(1500),
            " ".repeat(4096),
            "\n".repeat(3000),
            "!".repeat(4096),
            "é".repeat(2048),
            "😀".repeat(1024),
            format!(" {}", "a".repeat(4095)),
            mixed_prompt(16 * 1024),
            "<|im_start|>".repeat(400),
            "<|im_start|><|im_end|>x".repeat(300),
        ] {
            assert_same_as_reference(t, &text);
        }
    }

    /// A vocabulary where `a` runs merge by doubling up to 2^16: every level of the
    /// merge tree fires, whatever model file is at hand.
    fn doubling_tokenizer() -> Tokenizer {
        let mut tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
        let mut merges = Vec::new();
        for k in 1..=16 {
            let half = "a".repeat(1 << (k - 1));
            merges.push(format!("{half} {half}"));
            tokens.push(half.repeat(2));
        }
        let types = vec![TOKEN_TYPE_NORMAL; tokens.len()];
        Tokenizer::new(tokens, types, &merges).expect("tokenizer")
    }

    /// The bounds a 128 KiB prompt of `n` bytes must keep: at most 3n heap pushes (n−1
    /// pairs at first, two per merge) and as many pops; comparisons O(n log n).
    fn assert_bounded(what: &str, n: usize, s: stats::Stats, n_specials: usize) {
        let n64 = n as u64;
        let log2 = u64::from(usize::BITS - n.leading_zeros());
        eprintln!(
            "{what}: {n} bytes, {} heap ops, {} comparisons, {} bytes scanned for specials",
            s.heap_ops, s.comparisons, s.scanned
        );
        assert!(s.heap_ops <= 6 * n64, "{what}: {} heap ops for {n} bytes", s.heap_ops);
        assert!(s.comparisons <= 4 * n64 * log2, "{what}: {} comparisons for {n} bytes", s.comparisons);
        assert!(s.scanned <= 2 * (n_specials + 1) * n, "{what}: {} bytes scanned for {n}", s.scanned);
    }

    #[test]
    fn long_prompts_take_n_log_n_work() {
        const N: usize = 128 * 1024;
        let t = real_or_synthetic();
        let mut flood = "<|im_start|>".repeat(N / 12);
        flood.push_str(&"<|im_end|>".repeat((N - flood.len()) / 10));
        let cases = [
            ("a run", "a".repeat(N)),
            ("random letters", random_letters(N, 7)),
            ("space run", " ".repeat(N)),
            ("punctuation run", "!".repeat(N)),
            ("é run", "é".repeat(N / 2)),
            ("mixed", mixed_prompt(N)),
            ("special flood", flood),
        ];
        for (what, text) in &cases {
            for special in [false, true] {
                stats::take();
                let ids = t.encode(text, special);
                let s = stats::take();
                assert!(!ids.is_empty());
                assert_eq!(t.decode(&ids).expect("decode"), *text, "{what} round trip");
                assert_bounded(what, text.len(), s, t.specials.len());
            }
        }
    }

    #[test]
    fn doubling_merges_take_n_log_n_work() {
        let t = doubling_tokenizer();
        let aa16 = t.token_id(&"a".repeat(1 << 16)).expect("a^65536");
        let a = t.token_id("a").expect("a");
        assert_same_as_reference(&t, &"a".repeat(4099));
        for (n, want) in [(1usize << 17, vec![aa16, aa16]), ((1 << 17) + 1, vec![aa16, aa16, a])] {
            stats::take();
            assert_eq!(t.encode(&"a".repeat(n), false), want);
            assert_bounded("doubling a run", n, stats::take(), 0);
        }
    }

    /// Wall-clock timings of adversarial prompts, by hand only (tests are not timed):
    /// `cargo test --release -p sampo-kernels --lib tokenizer::tests::time_adversarial -- --ignored --nocapture`
    /// with `SAMPO_TOK_SIZES=8192,32768` for other sizes, `SAMPO_TOK_REFERENCE=1` to
    /// time the old quadratic encoder instead.
    #[test]
    #[ignore = "wall-clock timing, run by hand"]
    fn time_adversarial() {
        let (t, real) = test_tokenizer();
        let old = std::env::var_os("SAMPO_TOK_REFERENCE").is_some();
        println!("real tokenizer: {real}, encoder: {}", if old { "reference (old)" } else { "heap (new)" });
        let sizes: Vec<usize> = std::env::var("SAMPO_TOK_SIZES")
            .ok()
            .map(|v| v.split(',').map(|x| x.parse().expect("size")).collect())
            .unwrap_or_else(|| vec![128 * 1024]);
        for &n in &sizes {
            let cases = [
                ("a-run", "a".repeat(n), false),
                ("random-letters", random_letters(n, 7), false),
                ("mixed", mixed_prompt(n), true),
                ("im_start-flood", "<|im_start|>".repeat(n / 12), true),
                ("space-run", " ".repeat(n), false),
            ];
            for (name, text, special) in &cases {
                let t0 = std::time::Instant::now();
                let ids = if old { reference::encode(&t, text, *special) } else { t.encode(text, *special) };
                println!(
                    "{name:>16} {:>7} bytes -> {:>6} tokens in {:>9.3} ms",
                    text.len(),
                    ids.len(),
                    t0.elapsed().as_secs_f64() * 1e3
                );
            }
        }
    }
}
