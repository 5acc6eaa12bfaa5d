//! The real gateway program, built inside the test crate so that cluster tests can spawn it
//! through `CARGO_BIN_EXE_gateway-node` (Cargo exposes binaries only to their own package).
fn main() {
    gateway::cli::main()
}
