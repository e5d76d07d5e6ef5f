//! Builds the CPU emulator of the CUDA kernels when the `cuda-emulator` feature is on
//! (the crate's own tests turn it on; the node never does).

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    if std::env::var_os("CARGO_FEATURE_CUDA_EMULATOR").is_none() {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .file("cuda/emu/emu.cpp")
        .include("cuda")
        .flag("-std=c++17")
        // IEEE single precision, one rounding per operation: what the kernels' explicit
        // __f*_rn intrinsics and --fmad=false ask of the GPU.
        .flag("-ffp-contract=off")
        .flag("-fno-fast-math")
        .opt_level(2)
        .warnings(true)
        .compile("sampo_cuda_emu");
}
