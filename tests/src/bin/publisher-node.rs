//! The real publisher program, built inside the test crate so that tests can spawn it through
//! `CARGO_BIN_EXE_publisher-node` (Cargo exposes binaries only to their own package).
fn main() {
    publisher::cli::main()
}
