//! The `supermachine` command (the `cli` feature).
mod cli;

fn main() {
    std::process::exit(cli::main());
}
