//! `unibus bench`.

pub async fn run(quick: bool, json: bool) -> u8 {
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
    let opts = unibus::bench::Options { quick };
    let report =
        tokio::task::spawn_blocking(move || unibus::bench::run(&unibus, &nats_server, opts)).await;
    match report {
        Ok(report) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            0
        }
        Ok(report) => {
            print!("{}", unibus::bench::table(&report));
            0
        }
        Err(e) => {
            eprintln!("error: the benchmark failed: {e}");
            1
        }
    }
}
