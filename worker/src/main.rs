//! supermachine-worker: one VM per process. See `supermachine::worker`.
fn main() {
    std::process::exit(supermachine::worker::process::main());
}
