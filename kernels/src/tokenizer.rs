//! GPT-2-style byte-level BPE built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Pre-tokenization follows llama.cpp's `smollm` rules: first every numeric character
//! is split off on its own (`\p{N}`), then each piece is split by the GPT-2 pattern
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
//! Special tokens (control and user-defined types) found in the text are emitted as
//! themselves when `parse_special` is set.

use std::collections::HashMap;

use unicode_general_category::{GeneralCategory, get_general_category};

use crate::gguf::{GgufError, GgufFile};

/// llama.cpp token types.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model `{0}` (supported: gpt2)")]
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
    /// Special tokens, longest first, for matching in text.
    specials: Vec<(String, u32)>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Vec<u32>,
    pub chat_template: Option<String>,
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

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TokenizerError> {
        let model = f.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
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
        let mut t = Self::new(tokens, types, &merges)?;
        t.bos = id("tokenizer.ggml.bos_token_id").filter(|&i| (i as usize) < t.tokens.len());
        t.eos = id("tokenizer.ggml.eos_token_id").filter(|&i| (i as usize) < t.tokens.len());
        t.eot = t.eos.into_iter().collect();
        for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
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
        Ok(Self {
            tokens,
            types,
            ids,
            merges: merge_map,
            byte_to_char,
            char_to_byte,
            specials,
            bos: None,
            eos: None,
            eot: Vec::new(),
            chat_template: None,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    pub fn is_special(&self, id: u32) -> bool {
        matches!(self.types.get(id as usize), Some(&TOKEN_TYPE_CONTROL))
    }

    /// Encode `text`; special-token strings in it are parsed when `parse_special`.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = if parse_special { self.find_special(rest) } else { None };
            match next {
                Some((pos, len, id)) => {
                    self.encode_plain(&rest[..pos], &mut out);
                    out.push(id);
                    rest = &rest[pos + len..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    fn find_special(&self, s: &str) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (tok, id) in &self.specials {
            if let Some(p) = s.find(tok.as_str()) {
                // Earliest match wins; at equal position the longest (specials are sorted).
                if best.is_none_or(|(bp, _, _)| p < bp) {
                    best = Some((p, tok.len(), *id));
                }
            }
        }
        best
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        for piece in pre_tokenize(text) {
            self.bpe(piece, out);
        }
    }

    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        let mapped: String = piece.bytes().map(|b| self.byte_to_char[b as usize]).collect();
        if let Some(&id) = self.ids.get(&mapped) {
            out.push(id);
            return;
        }
        // Symbols start as single byte-characters.
        let mut syms: Vec<u32> = Vec::with_capacity(mapped.len());
        for c in mapped.chars() {
            let mut buf = [0u8; 4];
            match self.ids.get(c.encode_utf8(&mut buf) as &str) {
                Some(&id) => syms.push(id),
                None => {
                    // A byte with no token: nothing sensible to emit but the unknown token 0.
                    syms.push(0);
                }
            }
        }
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&(syms[i], syms[i + 1]))
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

    /// The raw bytes a token stands for (special tokens: their text).
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>, TokenizerError> {
        let s = self.tokens.get(id as usize).ok_or(TokenizerError::UnknownId(id))?;
        if self.types[id as usize] == TOKEN_TYPE_CONTROL || self.types[id as usize] == TOKEN_TYPE_USER_DEFINED {
            return Ok(s.as_bytes().to_vec());
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
}
