//! `unibus bench` end to end, on its smallest useful slice: the JSON report's shape and a
//! read workload whose raw twin runs in a child process (`bench-responder`). Speed is never
//! asserted here; only that both sides were measured, their CPU cost included.

mod common;

use common::*;

#[test]
fn bench_json_reports_ctl_read_with_both_sides_measured() {
    let (code, stdout, stderr) = unibus(&["bench", "--quick", "--json", "--only", "ctl_read"]);
    assert_eq!(code, 0, "bench failed: {stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert!(report["machine"].is_object() || report["machine"].is_string());
    let workloads = report["workloads"].as_array().expect("workloads");
    assert_eq!(workloads.len(), 1, "only ctl_read was asked for: {stdout}");
    let read = &workloads[0];
    assert_eq!(read["name"], "ctl_read");
    for side in [
        "unibus",
        "raw",
        "ratio",
        "cpu_ms_per_op",
        "raw_cpu_ms_per_op",
    ] {
        let v = read[side].as_f64().unwrap_or(0.0);
        assert!(v > 0.0, "{side} not measured: {read}");
    }
    for share in ["busy", "raw_busy"] {
        let v = read[share].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&v), "{share} not a share: {read}");
    }
    assert_eq!(read["unit"], "ops/s");
}

#[test]
fn bench_refuses_an_unknown_workload_name() {
    let (code, _, stderr) = unibus(&["bench", "--only", "ctl_raed"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a workload"), "{stderr}");
}
