//! The CUDA backend — its host code and the very kernel sources the GPU runs — on the
//! CPU emulator of the CUDA execution model (no GPU needed), against the CPU backend:
//! every logit must be the same bits. The GPU itself runs the same checks in
//! `cuda_gpu.rs`.

use std::sync::Arc;

use sampo_kernels::cuda::emu::{EmuDevice, Fault};
use sampo_kernels::cuda::{CudaBackend, CudaError, Kernel, known_answer_test};
use sampo_kernels::gguf::GgufFile;
use sampo_kernels::synth::{SynthSpec, synthesize};
use sampo_kernels::{Backend, BatchItem, CpuBackend, Engine, Model, ModelError, SamplingParams, Sequence};

fn synth() -> Arc<Model> {
    let spec = SynthSpec { n_ctx: 256, ..SynthSpec::default() };
    Arc::new(Model::from_gguf(GgufFile::from_bytes(synthesize(&spec)).expect("gguf")).expect("model"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn tokens(model: &Model, n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64).map(|i| ((i * 7919 + seed * 104_729 + 3) % model.hp.n_vocab as u64) as u32).collect()
}

#[test]
fn prefill_logits_are_the_cpu_bits() {
    let m = synth();
    let cpu = CpuBackend::new(1).expect("cpu");
    let gpu = CudaBackend::new(EmuDevice::new());
    for len in [1usize, 5, 33] {
        let p = tokens(&m, len, len as u64);
        let mut s1 = Sequence::new(&m);
        let mut s2 = Sequence::new(&m);
        let want = cpu.forward(&m, &mut [BatchItem { seq: &mut s1, tokens: &p }]).expect("cpu");
        let got = gpu.forward(&m, &mut [BatchItem { seq: &mut s2, tokens: &p }]).expect("emulated cuda");
        assert_eq!(bits(&got[0]), bits(&want[0]), "prompt of {len} tokens");
        assert_eq!(s2.pos, len);
    }
}
