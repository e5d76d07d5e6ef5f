//! The GGUF reader. Every read is bounds-checked against the file; counts read from
//! the file are checked against the bytes that remain before anything is allocated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::types::{GgmlType, MetaValue, ValueType};
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// Deepest nesting of arrays we accept (the spec has no limit; real files use 1).
const MAX_ARRAY_DEPTH: usize = 4;
const MAX_DIMS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("not a GGUF file (magic {found:02x?})")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("file truncated: needed {needed} bytes at offset {offset} while reading {what}, file is {len} bytes")]
    Truncated { what: String, offset: u64, needed: u64, len: u64 },
    #[error("invalid {what} at offset {offset}: {reason}")]
    Invalid { what: String, offset: u64, reason: String },
    #[error("tensor `{tensor}` ({ty}, {elements} elements): {reason}")]
    BadTensor { tensor: String, ty: GgmlType, elements: u64, reason: String },
    #[error("missing metadata key `{0}`")]
    MissingKey(String),
    #[error("metadata key `{key}` has type {found:?}, expected {expected}")]
    WrongKeyType { key: String, found: ValueType, expected: &'static str },
    #[error("no tensor named `{0}`")]
    MissingTensor(String),
}

/// One tensor's description; `offset` is absolute within the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (GGUF order): `dims[0]` is the row length.
    pub dims: Vec<u64>,
    /// The type as the file names it, supported or not (see [`GgmlType::is_supported`]).
    pub ty: GgmlType,
    pub offset: u64,
    /// Bytes of data; 0 for a type whose layout is unknown ([`GgmlType::Unknown`]),
    /// whose extent cannot be checked (nor used).
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

enum Source {
    Mmap(memmap2::Mmap),
    Bytes(Vec<u8>),
}

/// An open GGUF file: metadata and tensor descriptions parsed, data memory-mapped.
pub struct GgufFile {
    source: Source,
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    pub data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated {
                what: what.to_owned(),
                offset: self.pos as u64,
                needed: n,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.arr::<4>(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.arr::<8>(what).map(u64::from_le_bytes)
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.pos as u64;
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| GgufError::Invalid {
            what: what.to_owned(),
            offset: at,
            reason: format!("not UTF-8: {e}"),
        })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.arr::<1>(key)?[0]),
            ValueType::I8 => MetaValue::I8(self.arr::<1>(key)?[0] as i8),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.arr(key)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.arr(key)?)),
            ValueType::U32 => MetaValue::U32(u32::from_le_bytes(self.arr(key)?)),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.arr(key)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.arr(key)?)),
            ValueType::U64 => MetaValue::U64(u64::from_le_bytes(self.arr(key)?)),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.arr(key)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.arr(key)?)),
            ValueType::Bool => {
                let at = self.pos as u64;
                match self.arr::<1>(key)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(GgufError::Invalid {
                            what: format!("bool `{key}`"),
                            offset: at,
                            reason: format!("byte {b}"),
                        });
                    }
                }
            }
            ValueType::String => MetaValue::String(self.string(key)?),
            ValueType::Array => {
                let at = self.pos as u64;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Invalid {
                        what: format!("array `{key}`"),
                        offset: at,
                        reason: "nested too deeply".into(),
                    });
                }
                let et = self.u32(key)?;
                let et = ValueType::from_u32(et).ok_or_else(|| GgufError::Invalid {
                    what: format!("array `{key}`"),
                    offset: at,
                    reason: format!("unknown element type {et}"),
                })?;
                let n = self.u64(key)?;
                // Every element takes at least its type's smallest encoding: a count
                // beyond what remains is a lie, refused before anything is allocated.
                let needed = n.saturating_mul(et.min_encoded_len());
                if needed > self.remaining() {
                    return Err(GgufError::Truncated {
                        what: format!("array `{key}` of {n} elements"),
                        offset: at,
                        needed,
                        len: self.buf.len() as u64,
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
        })
    }
}

impl GgufFile {
    /// Memory-map and parse `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path).map_err(|source| GgufError::Open { path: path.to_owned(), source })?;
        // SAFETY: the map is read-only; a file truncated under us by another process
        // would fault, which no reader of a mapped file can prevent. Operators are told
        // not to modify model files in place.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|source| GgufError::Open { path: path.to_owned(), source })?;
        Self::parse(Source::Mmap(map))
    }

    /// The same file with its bytes copied into private memory backed by huge pages
    /// where the kernel gives them (`MADV_HUGEPAGE`), for inference: decode streams every
    /// weight once per token, and with 4 KiB pages of a file map a good part of that
    /// time went to TLB misses (Gemma 3 270M, 1 thread: 46 -> 58 tok/s). The file map is
    /// released chunk by chunk as it is copied, so peak RSS stays about one copy of the
    /// file. Falls back to the file map where anonymous memory cannot be had.
    pub fn into_resident(self) -> Self {
        let Source::Mmap(map) = &self.source else { return self };
        let Ok(mut anon) = memmap2::MmapMut::map_anon(map.len()) else { return self };
        let _ = anon.advise(memmap2::Advice::HugePage);
        const CHUNK: usize = 16 << 20;
        let mut at = 0;
        while at < map.len() {
            let n = CHUNK.min(map.len() - at);
            anon[at..at + n].copy_from_slice(&map[at..at + n]);
            // SAFETY: a read-only file map: dropping its pages only makes a later read
            // fault them in again from the page cache; nothing reads them after this.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, n) };
            at += n;
        }
        match anon.make_read_only() {
            Ok(ro) => Self { source: Source::Mmap(ro), ..self },
            Err(_) => self,
        }
    }

    /// Parse bytes held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Source::Bytes(bytes))
    }

    fn parse(source: Source) -> Result<Self, GgufError> {
        let buf: &[u8] = match &source {
            Source::Mmap(m) => m,
            Source::Bytes(b) => b,
        };
        let (version, alignment, metadata, tensors, data_offset) = parse_header(buf)?;
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Self { source, version, alignment, metadata, tensors, index, data_offset })
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.source {
            Source::Mmap(m) => m,
            Source::Bytes(b) => b,
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor (bounds were checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.bytes()[t.offset as usize..(t.offset + t.n_bytes) as usize]
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::MissingKey(key.to_owned()))?;
        v.as_u64().ok_or(GgufError::WrongKeyType {
            key: key.to_owned(),
            found: v.value_type(),
            expected: "an unsigned integer",
        })
    }

    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::MissingKey(key.to_owned()))?;
        v.as_f32().ok_or(GgufError::WrongKeyType { key: key.to_owned(), found: v.value_type(), expected: "a float" })
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::MissingKey(key.to_owned()))?;
        v.as_str().ok_or(GgufError::WrongKeyType { key: key.to_owned(), found: v.value_type(), expected: "a string" })
    }

    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::MissingKey(key.to_owned()))?;
        v.as_array().ok_or(GgufError::WrongKeyType { key: key.to_owned(), found: v.value_type(), expected: "an array" })
    }
}

type Header = (u32, u64, BTreeMap<String, MetaValue>, Vec<TensorInfo>, u64);

/// Parse the header of a GGUF file held in `buf`. Public for the fuzz target.
pub fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.take(4, "magic").map_err(|_| GgufError::BadMagic { found: buf[..buf.len().min(4)].to_vec() })?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic.to_vec() });
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // Each KV takes at least 12 bytes, each tensor info at least 24.
    if n_kv.saturating_mul(12) > c.remaining() || n_tensors.saturating_mul(24) > c.remaining() {
        return Err(GgufError::Invalid {
            what: "header".into(),
            offset: 8,
            reason: format!("{n_tensors} tensors and {n_kv} metadata entries cannot fit in {} bytes", buf.len()),
        });
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let at = c.pos as u64;
        let ty = c.u32(&key)?;
        let ty = ValueType::from_u32(ty).ok_or_else(|| GgufError::Invalid {
            what: format!("metadata `{key}`"),
            offset: at,
            reason: format!("unknown value type {ty}"),
        })?;
        let v = c.value(ty, &key, 0)?;
        metadata.insert(key, v);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a,
            _ => {
                return Err(GgufError::Invalid {
                    what: "general.alignment".into(),
                    offset: 0,
                    reason: format!("{v:?} is not a power of two up to 65536"),
                });
            }
        },
    };
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let at = c.pos as u64;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Invalid {
                what: format!("tensor `{name}`"),
                offset: at,
                reason: format!("{n_dims} dimensions"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        // Any type number is kept: a file sampo cannot run is still described (`sampo
        // model inspect`), and loading it fails naming the type (`ModelError`).
        let ty = GgmlType::from_u32(c.u32(&name)?);
        let rel = c.u64(&name)?;
        raw.push((name, dims, ty, rel));
    }
    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, ty, rel) in raw {
        let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let bad =
            |reason: String| GgufError::BadTensor { tensor: name.clone(), ty, elements: elements.unwrap_or(0), reason };
        let elements = elements.ok_or_else(|| bad("element count overflows".into()))?;
        if ty.layout().is_none() {
            if rel % alignment != 0 {
                return Err(bad(format!("data offset {rel} is not aligned to {alignment}")));
            }
            let offset = data_offset.checked_add(rel).filter(|&o| o <= len).ok_or_else(|| GgufError::Truncated {
                what: format!("data of tensor `{name}`"),
                offset: data_offset.saturating_add(rel),
                needed: 0,
                len,
            })?;
            tensors.push(TensorInfo { name, dims, ty, offset, n_bytes: 0 });
            continue;
        }
        if dims[0] % ty.block_len() as u64 != 0 {
            return Err(bad(format!("row length {} is not a multiple of the block size {}", dims[0], ty.block_len())));
        }
        // Whole blocks (the row length is), so `None` means the byte size overflows.
        let n_bytes = ty.bytes_for(elements).ok_or_else(|| bad("size in bytes overflows".into()))?;
        if rel % alignment != 0 {
            return Err(bad(format!("data offset {rel} is not aligned to {alignment}")));
        }
        let offset = data_offset.checked_add(rel).ok_or_else(|| bad("offset overflows".into()))?;
        let end = offset.checked_add(n_bytes).ok_or_else(|| bad("size overflows".into()))?;
        if end > len {
            return Err(GgufError::Truncated {
                what: format!("data of tensor `{name}`"),
                offset,
                needed: n_bytes,
                len,
            });
        }
        tensors.push(TensorInfo { name, dims, ty, offset, n_bytes });
    }
    let mut names = std::collections::BTreeSet::new();
    for t in &tensors {
        if !names.insert(t.name.as_str()) {
            return Err(GgufError::Invalid {
                what: format!("tensor `{}`", t.name),
                offset: 0,
                reason: "duplicate name".into(),
            });
        }
    }
    Ok((version, alignment, metadata, tensors, data_offset))
}
