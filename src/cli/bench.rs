//! `unibus bench`.

pub async fn run(quick: bool, json: bool, only: Vec<String>) -> u8 {
    let nats_server = match unibus::node::supervisor::locate_nats_server(None) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let unibus = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find the unibus binary: {e}");
            return 2;
        }
    };
    if let Some(unknown) = only
        .iter()
        .find(|o| !unibus::bench::NAMES.contains(&o.as_str()))
    {
        eprintln!(
            "error: --only {unknown}: not a workload; one of {}",
            unibus::bench::NAMES.join(", ")
        );
        return 2;
    }
    let opts = unibus::bench::Options { quick, only };
    let report = unibus::bench::run(&unibus, &nats_server, opts).await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", unibus::bench::table(&report));
    }
    0
}

/// `unibus bench-responder` (hidden): the raw twin's responder, a child of `unibus bench`.
pub async fn responder(server: &str, secrets: &std::path::Path) -> u8 {
    match unibus::bench::responder::serve(server, secrets).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
