//! A build without the `cuda` feature has no GPU tests: it says so, and `REQUIRE_GPU=1` makes
//! that a failure (as a missing device would be).

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_tests_need_the_cuda_feature() {
    assert!(
        !dsv3::registry::gpu::required_by_env(),
        "REQUIRE_GPU=1 but this dsv3 was built without the `cuda` feature"
    );
    eprintln!("SKIP GPU tests: this dsv3 was built without the `cuda` feature");
    assert!(dsv3::registry::gpu::device().is_err());
}

/// Every GPU backend stays listed without the feature; with it, the device check decides.
#[test]
fn gpu_backends_are_listed_in_every_build() {
    let act_quant = dsv3::ops::find("act_quant").unwrap();
    assert_eq!(act_quant.gpu.len(), 1);
    assert_eq!(act_quant.gpu[0].kernel, "gpu/kernels/act_quant.cu");
}
