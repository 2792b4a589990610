//! Image references the CLI and API accept. Today: `oci-layout:DIR[:TAG]`.

use std::fmt;
use std::path::PathBuf;

use crate::BakeError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout directory; `tag` matches `org.opencontainers.image.ref.name`.
    OciLayout { dir: PathBuf, tag: Option<String> },
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, BakeError> {
        let err = |reason: &str| BakeError::Reference {
            reference: s.to_string(),
            reason: reason.into(),
        };
        if let Some(rest) = s.strip_prefix("oci-layout:") {
            if rest.is_empty() {
                return Err(err("expected oci-layout:DIR or oci-layout:DIR:TAG"));
            }
            // DIR may itself contain ':'; a suffix is a tag only if the whole is not a dir.
            if !std::path::Path::new(rest).is_dir() {
                if let Some((dir, tag)) = rest.rsplit_once(':') {
                    if !tag.is_empty() && !tag.contains('/') && !dir.is_empty() {
                        return Ok(ImageRef::OciLayout {
                            dir: dir.into(),
                            tag: Some(tag.into()),
                        });
                    }
                }
            }
            return Ok(ImageRef::OciLayout {
                dir: rest.into(),
                tag: None,
            });
        }
        Err(err(
            "only oci-layout:DIR[:TAG] images are supported by this build",
        ))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::OciLayout { dir, tag: Some(t) } => {
                write!(f, "oci-layout:{}:{t}", dir.display())
            }
            ImageRef::OciLayout { dir, tag: None } => write!(f, "oci-layout:{}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layouts_and_tags() {
        assert_eq!(
            ImageRef::parse("oci-layout:/x/y:v1").unwrap(),
            ImageRef::OciLayout {
                dir: "/x/y".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci-layout:rel").unwrap(),
            ImageRef::OciLayout {
                dir: "rel".into(),
                tag: None
            }
        );
        let e = ImageRef::parse("nginx:latest").unwrap_err().to_string();
        assert!(e.contains("nginx:latest"), "{e}");
        assert!(ImageRef::parse("oci-layout:").is_err());
    }
}
