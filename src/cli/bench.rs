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
