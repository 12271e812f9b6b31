//! The CRD YAML shipped in flux/crds/ is what the Rust types generate
//! (regenerate with `backstop crd > flux/crds/migrationruns.backstop.dev.yaml`).

#[test]
fn flux_crds_match_the_rust_types() {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/flux/crds/migrationruns.backstop.dev.yaml"
    ))
    .expect("flux/crds/migrationruns.backstop.dev.yaml exists");
    let generated = backstop::k8s::crd::crds_yaml().unwrap();
    assert!(
        shipped == generated,
        "flux/crds/ drifted from src/k8s/crd.rs: run `backstop crd > flux/crds/migrationruns.backstop.dev.yaml`"
    );
}
