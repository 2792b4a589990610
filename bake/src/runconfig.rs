//! Merging the image's config with the user's overrides, with `docker run`'s semantics:
//! ARGV replaces Cmd; `--entrypoint` replaces Entrypoint *and* clears the image's Cmd;
//! `-e K=V` is appended after the image's Env (later wins); `-e K` takes the host's value.

use oci_spec::image::Config;
use supermachine_protocol::RunConfig;

use crate::BakeError;

#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `Some("")` clears the image's Entrypoint.
    pub entrypoint: Option<String>,
    /// Replaces the image's Cmd when given (even when empty).
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
}

pub fn merge(image: Option<&Config>, ov: &Overrides) -> Result<RunConfig, BakeError> {
    let image_entrypoint = image
        .and_then(|c| c.entrypoint().clone())
        .unwrap_or_default();
    let image_cmd = image.and_then(|c| c.cmd().clone()).unwrap_or_default();
    let (entrypoint, cmd) = match &ov.entrypoint {
        Some(e) => {
            let ep = if e.is_empty() {
                vec![]
            } else {
                vec![e.clone()]
            };
            (ep, ov.cmd.clone().unwrap_or_default())
        }
        None => (image_entrypoint, ov.cmd.clone().unwrap_or(image_cmd)),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(BakeError::NoCommand);
    }
    let mut env = image.and_then(|c| c.env().clone()).unwrap_or_default();
    for kv in &ov.env {
        if kv.contains('=') {
            env.push(kv.clone());
        } else if let Ok(v) = std::env::var(kv) {
            env.push(format!("{kv}={v}"));
        }
    }
    let workdir = ov
        .workdir
        .clone()
        .or_else(|| image.and_then(|c| c.working_dir().clone()))
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let user = ov
        .user
        .clone()
        .or_else(|| image.and_then(|c| c.user().clone()))
        .unwrap_or_default();
    Ok(RunConfig {
        argv,
        env,
        workdir,
        user,
        hostname: ov.hostname.clone().unwrap_or_else(|| "supermachine".into()),
        layers: vec![],
        volumes: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::ConfigBuilder;

    fn image() -> Config {
        ConfigBuilder::default()
            .entrypoint(vec!["/bin/ep".to_string(), "-x".to_string()])
            .cmd(vec!["default".to_string()])
            .env(vec!["A=1".to_string()])
            .working_dir("/srv".to_string())
            .user("app".to_string())
            .build()
            .unwrap()
    }

    #[test]
    fn docker_run_semantics() {
        let img = image();
        let plain = merge(Some(&img), &Overrides::default()).unwrap();
        assert_eq!(plain.argv, ["/bin/ep", "-x", "default"]);
        assert_eq!(
            (plain.workdir.as_str(), plain.user.as_str()),
            ("/srv", "app")
        );

        let argv = merge(
            Some(&img),
            &Overrides {
                cmd: Some(vec!["other".into()]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(argv.argv, ["/bin/ep", "-x", "other"]);

        let ep = merge(
            Some(&img),
            &Overrides {
                entrypoint: Some("/bin/sh".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(ep.argv, ["/bin/sh"], "--entrypoint clears the image's Cmd");

        let cleared = merge(
            Some(&img),
            &Overrides {
                entrypoint: Some(String::new()),
                cmd: Some(vec!["/bin/true".into()]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cleared.argv, ["/bin/true"]);

        let env = merge(
            Some(&img),
            &Overrides {
                env: vec!["A=2".into(), "B=3".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(env.env, ["A=1", "A=2", "B=3"]);

        assert!(matches!(
            merge(None, &Overrides::default()),
            Err(BakeError::NoCommand)
        ));
    }
}
