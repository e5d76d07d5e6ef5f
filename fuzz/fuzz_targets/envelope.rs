#![no_main]
//! Drives the signed-envelope decoder with arbitrary bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sampo_consensus::SignedEnvelope::from_bytes(data);
});
