#![no_main]
//! Drives the GGUF header parser (and, when it accepts, the model loader) with arbitrary bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(f) = sampo_kernels::gguf::GgufFile::from_bytes(data.to_vec()) {
        let _ = sampo_kernels::Model::from_gguf(f);
    }
});
