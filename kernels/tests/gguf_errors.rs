//! Truncated, corrupt and unsupported GGUF files give typed errors naming what is
//! wrong, never a panic or an out-of-bounds read.

use proptest::prelude::*;
use sampo_kernels::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetaValue};
use sampo_kernels::synth::{SynthSpec, synthesize};
use sampo_kernels::{Model, ModelError};

fn synth() -> Vec<u8> {
    synthesize(&SynthSpec::default())
}

#[test]
fn synthetic_file_round_trips() {
    let f = GgufFile::from_bytes(synth()).expect("parse");
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture").expect("arch"), "llama");
    let t = f.tensor("blk.0.attn_q.weight").expect("tensor");
    assert_eq!(t.ty, GgmlType::Q4_1);
    assert_eq!(t.dims, vec![64, 64]);
    let m = Model::from_gguf(f).expect("model");
    assert_eq!(m.hp.n_layer, 2);
}

#[test]
fn every_truncation_is_a_typed_error() {
    let bytes = synth();
    let step = (bytes.len() / 400).max(1);
    for cut in (0..bytes.len()).step_by(step) {
        match GgufFile::from_bytes(bytes[..cut].to_vec()) {
            Err(GgufError::Truncated { .. } | GgufError::BadMagic { .. } | GgufError::Invalid { .. }) => {}
            Err(e) => panic!("cut at {cut}: unexpected error kind {e}"),
            Ok(_) => panic!("cut at {cut} of {} parsed", bytes.len()),
        }
    }
}

#[test]
fn tensor_data_past_the_end_names_the_tensor() {
    let mut bytes = synth();
    bytes.truncate(bytes.len() - 100);
    let err = GgufFile::from_bytes(bytes).expect_err("truncated data");
    let msg = err.to_string();
    assert!(matches!(err, GgufError::Truncated { .. }) && msg.contains("blk.1.ffn_down.weight"), "{msg}");
}

#[test]
fn bad_magic_and_version() {
    let mut bytes = synth();
    bytes[0] = b'X';
    assert!(matches!(GgufFile::from_bytes(bytes.clone()), Err(GgufError::BadMagic { .. })));
    bytes[0] = b'G';
    bytes[4] = 9;
    assert!(matches!(GgufFile::from_bytes(bytes), Err(GgufError::UnsupportedVersion(9))));
}

/// The synthetic model with one tensor's type number replaced (its bytes kept).
fn synth_with_type(tensor: &str, ty: GgmlType) -> Vec<u8> {
    let f = GgufFile::from_bytes(synth()).expect("parse");
    let mut w = GgufWriter::new();
    for (k, v) in &f.metadata {
        w.meta(k, v.clone());
    }
    for t in &f.tensors {
        let tt = if t.name == tensor { ty } else { t.ty };
        w.tensor(&t.name, &t.dims, tt, f.tensor_data(t).to_vec());
    }
    w.to_bytes()
}

#[test]
fn unsupported_tensor_types_are_read_and_refused_at_load_by_name() {
    // IQ4_NL has Q4_0's block size, so only the type number differs: the file reads,
    // the tensor keeps its type, and loading names tensor and type.
    let name = "blk.1.attn_v.weight";
    let f = GgufFile::from_bytes(synth()).expect("parse");
    assert_eq!(f.tensor(name).expect("tensor").ty.block_bytes(), GgmlType::IQ4_NL.block_bytes());
    let f = GgufFile::from_bytes(synth_with_type(name, GgmlType::IQ4_NL)).expect("an unsupported type still parses");
    assert_eq!(f.tensor(name).expect("tensor").ty, GgmlType::IQ4_NL);
    let err = Model::from_gguf(f).expect_err("unsupported");
    assert!(matches!(&err, ModelError::UnsupportedType { name: n, ty: GgmlType::IQ4_NL } if n == name), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("IQ4_NL (type 20)") && msg.contains(name) && msg.contains("Q6_K"), "{msg}");
    // A number ggml never assigned: kept raw, no size known, refused by number.
    let f = GgufFile::from_bytes(synth_with_type(name, GgmlType::from_u32(77))).expect("an unknown type still parses");
    let t = f.tensor(name).expect("tensor");
    assert_eq!((t.ty, t.n_bytes), (GgmlType::Unknown(77), 0));
    let err = Model::from_gguf(f).expect_err("unknown");
    assert!(err.to_string().contains("unknown type 77"), "{err}");
}

#[test]
fn absurd_counts_do_not_allocate() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    assert!(matches!(GgufFile::from_bytes(bytes), Err(GgufError::Invalid { .. })));
    // An array claiming 2^60 elements.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.push(b'k');
    bytes.extend(9u32.to_le_bytes());
    bytes.extend(4u32.to_le_bytes());
    bytes.extend((1u64 << 60).to_le_bytes());
    bytes.extend([0u8; 64]);
    assert!(matches!(GgufFile::from_bytes(bytes), Err(GgufError::Truncated { .. })));
}

#[test]
fn wrong_shape_is_a_model_error() {
    let mut w = GgufWriter::new();
    let f = GgufFile::from_bytes(synth()).expect("parse");
    for (k, v) in &f.metadata {
        let v = if k == "llama.embedding_length" { MetaValue::U32(128) } else { v.clone() };
        w.meta(k, v);
    }
    for t in &f.tensors {
        w.tensor(&t.name, &t.dims, t.ty, f.tensor_data(t).to_vec());
    }
    let err = Model::from_gguf(GgufFile::from_bytes(w.to_bytes()).expect("parse")).expect_err("shape");
    assert!(matches!(err, ModelError::Shape { .. }), "{err}");
}

#[test]
fn missing_file_is_typed() {
    assert!(matches!(GgufFile::open(std::path::Path::new("/nonexistent.gguf")), Err(GgufError::Open { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn corrupt_bytes_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = synth();
        // Corrupt the header region, where the parser does its work.
        let header = 6000.min(bytes.len());
        for (i, b) in flips {
            let at = i.index(header);
            bytes[at] = b;
        }
        if let Ok(f) = GgufFile::from_bytes(bytes) {
            let _ = Model::from_gguf(f);
        }
    }
}
