use std::path::PathBuf;

use clawos_api::code;
use clawos_image::ImageError;

use super::*;

#[test]
fn an_image_refusal_keeps_what_failed_as_its_code() {
    let cases = [
        (
            ImageError::HashMismatch {
                what: "kernel",
                path: PathBuf::from("/i/vmlinuz"),
                expected: "a".into(),
                actual: "b".into(),
            },
            code::IMAGE_HASH_MISMATCH,
        ),
        (
            ImageError::SignatureMismatch { pubkey: "k".into() },
            code::IMAGE_BAD_SIGNATURE,
        ),
        (
            ImageError::SignatureSyntax {
                path: PathBuf::from("/i/manifest.sig"),
            },
            code::IMAGE_BAD_SIGNATURE,
        ),
        (
            ImageError::Unsigned {
                path: PathBuf::from("/i/manifest.sig"),
            },
            code::IMAGE_UNSIGNED,
        ),
        (
            ImageError::RootfsSize {
                path: PathBuf::from("/i/rootfs.img"),
                expected: 1,
                actual: 2,
            },
            code::IMAGE_SIZE_MISMATCH,
        ),
        (
            ImageError::RootHashPin {
                expected: "a".into(),
                actual: "b".into(),
            },
            code::IMAGE_ROOT_HASH_MISMATCH,
        ),
        (
            ImageError::ManifestVersion {
                path: PathBuf::from("/i/manifest.json"),
                found: 9,
            },
            code::IMAGE_INVALID,
        ),
    ];
    for (e, want) in cases {
        let message = e.to_string();
        let r = ErrorResponse::from(LauncherError::image_refused(&e));
        assert_eq!(
            (r.status, r.code, r.message.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, want, message.as_str())
        );
        assert_eq!(clawos_api::exit_code(r.code), 5);
    }
    let r = ErrorResponse::from(LauncherError::image_unbootable("no vmlinux".into()));
    assert_eq!(r.code, code::IMAGE_INVALID);
}

#[test]
fn state_and_lookup_errors_keep_their_codes() {
    for (e, status, want, exit) in [
        (
            LauncherError::NotFound("no VM x".into()),
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            3,
        ),
        (
            LauncherError::Conflict("x is running".into()),
            StatusCode::CONFLICT,
            code::CONFLICT,
            4,
        ),
        (
            LauncherError::Invalid("bad".into()),
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            1,
        ),
        (
            LauncherError::Internal("boom".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
            code::INTERNAL,
            1,
        ),
    ] {
        let r = ErrorResponse::from(e);
        assert_eq!((r.status, r.code), (status, want));
        assert_eq!(clawos_api::exit_code(r.code), exit);
    }
}
