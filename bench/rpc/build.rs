//! Generates the tonic echo service with the `protoc` shipped inside the
//! `protoc-bin-vendored` crate (nothing is downloaded at build time).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through $PROTOC. Build scripts are single-threaded here.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/echo.proto"], &["proto"])?;
    Ok(())
}
