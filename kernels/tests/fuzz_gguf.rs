//! Structured fuzzing of the GGUF reader and the model loader, run by every `cargo test`.
//!
//! A small valid synthetic model is mutated where the parser does its work: its header
//! fields (magic, version, counts, string and array lengths, value and tensor types,
//! dimensions, data offsets) are set to edge values or nudged, bytes are flipped,
//! inserted, deleted and copied, and the file is cut short. Every input must give a
//! typed error or a model whose tensors lie inside the file, without a panic and
//! without any single allocation out of proportion to the input. The case count is
//! fixed (not a time budget), so a run is reproducible and costs a few seconds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use sampo_kernels::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetaValue};
use sampo_kernels::synth::{SynthSpec, synthesize};
use sampo_kernels::{ChatMessage, CpuBackend, Engine, Model};

/// Cases per property (two properties): about 2 s of one core in all, dev profile. At
/// this count a run of the mutation property, without the fix, found the size overflow
/// of `regression_tensor_byte_size_overflow_is_typed` in 3 runs out of 4.
const CASES: u32 = 10_000;

// ---- allocation accounting -------------------------------------------------------

/// The system allocator, remembering the largest single request made on each thread.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the slot may be gone while a thread is being torn down.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping only touches a
// thread-local `Cell` that needs no allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Run `f` and return its result with the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// What loading an `n`-byte file may allocate at once: a small multiple of the input
/// (metadata values are wider than their encoding), plus the model's RoPE table, which
/// a tiny model claiming the largest context (2^17 positions) makes 8 MiB.
fn allocation_budget(n: usize) -> usize {
    64 * n + (16 << 20)
}

// ---- the seed file and a map of its header ---------------------------------------

/// The smallest synthetic model the loader accepts: a few tens of KiB, cheap to clone.
fn seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let spec =
            SynthSpec { seed: 7, n_embd: 32, n_layer: 1, n_head: 2, n_head_kv: 1, n_ff: 32, n_ctx: 64, weights: None };
        let bytes = synthesize(&spec);
        let fields = header_fields(&bytes);
        let header_end = fields.iter().map(|f| f.at + f.width).max().unwrap_or(0);
        Seed { bytes, fields, header_end }
    })
}

struct Seed {
    bytes: Vec<u8>,
    fields: Vec<Field>,
    header_end: usize,
}

/// One integer field of the header: where it is and how wide (4 or 8 bytes).
#[derive(Debug, Clone, Copy)]
struct Field {
    at: usize,
    width: usize,
    kind: Kind,
}

const KINDS: [Kind; 13] = [
    Kind::Magic,
    Kind::Version,
    Kind::TensorCount,
    Kind::KvCount,
    Kind::StringLen,
    Kind::ValueType,
    Kind::ArrayType,
    Kind::ArrayLen,
    Kind::Scalar,
    Kind::DimCount,
    Kind::Dim,
    Kind::TensorType,
    Kind::TensorOffset,
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Magic,
    Version,
    TensorCount,
    KvCount,
    StringLen,
    ValueType,
    ArrayType,
    ArrayLen,
    Scalar,
    DimCount,
    Dim,
    TensorType,
    TensorOffset,
}

/// Walk a valid file's header and list its integer fields (an independent reading of
/// the layout, so the fuzzer knows where the lengths and counts are).
fn header_fields(b: &[u8]) -> Vec<Field> {
    struct W<'a> {
        b: &'a [u8],
        pos: usize,
        out: Vec<Field>,
    }
    impl W<'_> {
        fn int(&mut self, width: usize, kind: Kind) -> u64 {
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(&self.b[self.pos..self.pos + width]);
            self.out.push(Field { at: self.pos, width, kind });
            self.pos += width;
            u64::from_le_bytes(v)
        }
        fn string(&mut self) {
            let n = self.int(8, Kind::StringLen);
            self.pos += n as usize;
        }
        fn value(&mut self, ty: u64) {
            match ty {
                0 | 1 | 7 => self.pos += 1,
                2 | 3 => self.pos += 2,
                4..=6 => {
                    self.int(4, Kind::Scalar);
                }
                10..=12 => {
                    self.int(8, Kind::Scalar);
                }
                8 => self.string(),
                9 => {
                    let et = self.int(4, Kind::ArrayType);
                    let n = self.int(8, Kind::ArrayLen);
                    for _ in 0..n {
                        self.value(et);
                    }
                }
                t => panic!("seed file has value type {t}"),
            }
        }
    }
    let mut w = W { b, pos: 0, out: Vec::new() };
    w.int(4, Kind::Magic);
    w.int(4, Kind::Version);
    let n_tensors = w.int(8, Kind::TensorCount);
    let n_kv = w.int(8, Kind::KvCount);
    for _ in 0..n_kv {
        w.string();
        let ty = w.int(4, Kind::ValueType);
        w.value(ty);
    }
    for _ in 0..n_tensors {
        w.string();
        let nd = w.int(4, Kind::DimCount);
        for _ in 0..nd {
            w.int(8, Kind::Dim);
        }
        w.int(4, Kind::TensorType);
        w.int(8, Kind::TensorOffset);
    }
    w.out
}

// ---- mutations ---------------------------------------------------------------------

#[derive(Debug, Clone)]
enum NewValue {
    /// An edge value (see [`edge_values`]).
    Edge(u64),
    /// The current value plus a small signed step.
    Nudge(i64),
    /// Any 64 bits.
    Any(u64),
}

fn edge_values() -> Vec<u64> {
    let mut v = vec![0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 14, 16, 30, 31, 32, 33, 64, 255, 256, 4096, 65_535, 65_536];
    for s in [31u32, 32, 48, 56, 60, 61, 62, 63] {
        v.push(1u64 << s);
        v.push((1u64 << s) - 1);
    }
    v.extend([u32::MAX as u64, u64::MAX, u64::MAX - 1, u64::MAX - 31, u64::MAX / 2]);
    // Counts whose size in bytes wraps past 2^64 to a few bytes, for each block size.
    for block_bytes in [2u64, 4, 18, 20, 34] {
        v.push(u64::MAX / block_bytes + 1);
    }
    v
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Rewrite one header field: the `field`th of those of kind `kind` (choosing the
    /// kind first gives the few dims and counts the same weight as the many lengths of
    /// the vocabulary's strings).
    SetField { kind: Kind, field: prop::sample::Index, value: NewValue },
    /// Overwrite one byte of the header.
    Byte { at: prop::sample::Index, value: u8 },
    /// Insert bytes into the header.
    Insert { at: prop::sample::Index, bytes: Vec<u8> },
    /// Remove bytes from the header.
    Delete { at: prop::sample::Index, len: usize },
    /// Copy a run of header bytes over another place in it.
    Splice { from: prop::sample::Index, to: prop::sample::Index, len: usize },
    /// Cut the file anywhere.
    Truncate { at: prop::sample::Index },
}

fn new_value() -> impl Strategy<Value = NewValue> {
    prop_oneof![
        4 => prop::sample::select(edge_values()).prop_map(NewValue::Edge),
        2 => (-40i64..40).prop_map(NewValue::Nudge),
        1 => any::<u64>().prop_map(NewValue::Any),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        8 => (prop::sample::select(KINDS.to_vec()), any::<prop::sample::Index>(), new_value())
            .prop_map(|(kind, field, value)| Mutation::SetField { kind, field, value }),
        3 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, value)| Mutation::Byte { at, value }),
        1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..24))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<prop::sample::Index>(), 1usize..24).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => (any::<prop::sample::Index>(), any::<prop::sample::Index>(), 1usize..64)
            .prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
        1 => any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(seed: &Seed, bytes: &mut Vec<u8>, m: &Mutation) {
    // Insertions and deletions move later fields: the field map is a best guess after
    // one of them, which is fine for a fuzzer (the write lands somewhere in the header).
    let header = seed.header_end.min(bytes.len()).max(1);
    match m {
        Mutation::SetField { kind, field, value } => {
            let of_kind: Vec<&Field> = seed.fields.iter().filter(|f| f.kind == *kind).collect();
            let f = *of_kind[field.index(of_kind.len())];
            if f.at + f.width > bytes.len() {
                return;
            }
            let slot = &mut bytes[f.at..f.at + f.width];
            let mut cur = [0u8; 8];
            cur[..f.width].copy_from_slice(slot);
            let cur = u64::from_le_bytes(cur);
            let v = match *value {
                NewValue::Edge(v) | NewValue::Any(v) => v,
                NewValue::Nudge(d) => cur.wrapping_add_signed(d),
            };
            slot.copy_from_slice(&v.to_le_bytes()[..f.width]);
        }
        Mutation::Byte { at, value } => {
            let i = at.index(header);
            if i < bytes.len() {
                bytes[i] = *value;
            }
        }
        Mutation::Insert { at, bytes: ins } => {
            let i = at.index(header);
            bytes.splice(i..i, ins.iter().copied());
        }
        Mutation::Delete { at, len } => {
            let i = at.index(header);
            let end = (i + len).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Splice { from, to, len } => {
            let (a, b) = (from.index(header), to.index(header));
            let n = (*len).min(bytes.len() - a).min(bytes.len() - b);
            let chunk = bytes[a..a + n].to_vec();
            bytes[b..b + n].copy_from_slice(&chunk);
        }
        Mutation::Truncate { at } => {
            let i = at.index(bytes.len());
            bytes.truncate(i);
        }
    }
}

// ---- the oracle ----------------------------------------------------------------------

/// What a parsed file must satisfy: every tensor's size is its element count in its
/// type (computed without overflow) and its bytes lie inside the file.
fn check_file(f: &GgufFile) -> Result<(), String> {
    let len = f.bytes().len() as u128;
    for t in &f.tensors {
        let elements = t.dims.iter().try_fold(1u128, |a, &d| a.checked_mul(d as u128)).ok_or("dims overflow u128")?;
        let bl = t.ty.block_len() as u128;
        if elements % bl != 0 {
            return Err(format!("{}: {elements} elements is not whole blocks of {bl}", t.name));
        }
        let bytes = elements / bl * t.ty.block_bytes() as u128;
        if bytes != t.n_bytes as u128 {
            return Err(format!("{}: {elements} elements of {} take {bytes} bytes, not {}", t.name, t.ty, t.n_bytes));
        }
        if t.offset as u128 + t.n_bytes as u128 > len {
            return Err(format!("{}: bytes {}+{} beyond the file of {len}", t.name, t.offset, t.n_bytes));
        }
        if t.n_elements() as u128 != elements {
            return Err(format!("{}: n_elements() overflows", t.name));
        }
        let _ = f.tensor_data(t);
    }
    Ok(())
}

enum Loaded {
    /// A typed error, from the reader or the loader.
    Rejected,
    Model(Arc<Model>),
}

/// Load `bytes` as a model. `Err` is a broken promise: a parsed file whose tensors do
/// not fit it, or an allocation out of proportion to the input.
fn load(bytes: Vec<u8>) -> Result<Loaded, String> {
    let n = bytes.len();
    let (result, largest) = largest_allocation(|| {
        let f = match GgufFile::from_bytes(bytes) {
            Ok(f) => f,
            Err(e) => {
                let _ = e.to_string();
                return Ok(Loaded::Rejected);
            }
        };
        check_file(&f)?;
        match Model::from_gguf(f) {
            Ok(m) => Ok(Loaded::Model(Arc::new(m))),
            Err(e) => {
                let _ = e.to_string();
                Ok(Loaded::Rejected)
            }
        }
    });
    if largest > allocation_budget(n) {
        return Err(format!("a {n}-byte file made an allocation of {largest} bytes"));
    }
    result
}

/// A model that loaded from a mutated file must also run: its (possibly mutated)
/// template renders or fails typed, and a forward pass of one token works.
fn exercise(m: Arc<Model>) {
    let e = Engine::new(m.clone(), Arc::new(CpuBackend::new(1).expect("pool")));
    let msgs = [ChatMessage { role: "user".into(), content: "hi <|im_end|>".into() }];
    let _ = e.chat_prompt(&msgs);
    let tok = m.tokenizer.bos.unwrap_or(0);
    let logits = e.logits(&[tok]).expect("one token fits any context");
    assert_eq!(logits.len(), m.hp.n_vocab);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_headers_give_typed_errors(muts in prop::collection::vec(mutation(), 1..5)) {
        let seed = seed();
        let mut bytes = seed.bytes.clone();
        for m in &muts {
            apply(seed, &mut bytes, m);
        }
        match load(bytes) {
            Ok(Loaded::Model(m)) => exercise(m),
            Ok(Loaded::Rejected) => {}
            Err(e) => prop_assert!(false, "{}", e),
        }
    }

    #[test]
    fn random_bytes_after_the_magic_give_typed_errors(
        version in prop::sample::select(vec![2u32, 3]),
        rest in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(rest);
        if let Err(e) = load(bytes) {
            prop_assert!(false, "{}", e);
        }
    }
}

#[test]
fn the_seed_loads_and_the_field_map_covers_its_header() {
    let seed = seed();
    let Ok(Loaded::Model(m)) = load(seed.bytes.clone()) else { panic!("the seed does not load") };
    exercise(m);
    let f = GgufFile::from_bytes(seed.bytes.clone()).expect("parse");
    // The map ends where the tensor infos end, and knows every tensor.
    assert!(seed.header_end as u64 <= f.data_offset && f.data_offset - (seed.header_end as u64) < f.alignment);
    let offsets = seed.fields.iter().filter(|f| f.kind == Kind::TensorOffset).count();
    assert_eq!(offsets, f.tensors.len());
    for k in KINDS {
        assert!(seed.fields.iter().any(|f| f.kind == k), "no {k:?} field");
    }
}

// ---- regressions: what the fuzzer found, kept by name ----------------------------------

/// A file with one tensor of the given dims and type and no data.
fn one_tensor(dims: &[u64], ty: GgmlType) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()));
    w.tensor("t.weight", dims, ty, Vec::new());
    w.to_bytes()
}

/// 2^62 f32 elements are 2^64 bytes: the size wrapped to 0 and the tensor was accepted
/// with no data at all (a panic with overflow checks on).
#[test]
fn regression_tensor_byte_size_overflow_is_typed() {
    for (dims, ty) in [
        (vec![1u64 << 62], GgmlType::F32),
        (vec![1u64 << 63], GgmlType::F16),
        (vec![1u64 << 31, 1 << 31], GgmlType::F32),
        (vec![1u64 << 63], GgmlType::BF16),
        // Q8_0 is the one block type larger than its element count (34 bytes per 32).
        (vec![32, u64::MAX / 34 + 1], GgmlType::Q8_0),
    ] {
        let err = GgufFile::from_bytes(one_tensor(&dims, ty)).expect_err("a tensor larger than memory");
        assert!(matches!(&err, GgufError::BadTensor { tensor, .. } if tensor == "t.weight"), "{dims:?} {ty}: {err}");
    }
}

/// Hardening (found reading the reader, not by the fuzzer): an array count was checked
/// against one byte per element, so an array of wider elements could claim up to 12
/// times more of them than the file holds (arrays of arrays), 32 bytes allocated each.
/// Now each element counts at its type's smallest encoding.
#[test]
fn array_counts_are_checked_against_element_size() {
    for (et, width) in [(9u32, 12u64), (8, 8), (10, 8), (4, 4), (2, 2)] {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.push(b'k');
        bytes.extend(9u32.to_le_bytes());
        bytes.extend(et.to_le_bytes());
        // One element more than the remaining bytes can hold.
        let room = 256u64;
        bytes.extend((room / width + 1).to_le_bytes());
        bytes.extend(vec![0u8; room as usize]);
        let (res, largest) = largest_allocation(|| GgufFile::from_bytes(bytes.clone()));
        assert!(matches!(res, Err(GgufError::Truncated { .. })), "type {et}: {res:?}");
        assert!(largest <= bytes.len() * 2, "type {et}: allocated {largest} for a {}-byte file", bytes.len());
    }
}
