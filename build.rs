//! Compiles src/image/jpeg/pixels.c against the libjpeg-turbo that
//! turbojpeg-sys builds (its headers, through the `links` metadata).

fn main() {
    println!("cargo:rerun-if-changed=src/image/jpeg/pixels.c");
    let include = std::env::var("DEP_TURBOJPEG_INCLUDE").expect("turbojpeg-sys gives its include directory");
    let mut build = cc::Build::new();
    for dir in include.split(',') {
        build.include(dir);
    }
    build.file("src/image/jpeg/pixels.c").warnings(true).compile("classifier_jpeg_pixels");
}
