//! The part of an image's configuration that says how to start its
//! process: what `docker run IMAGE [CMD...]` would execute, with which
//! environment, working directory and user.

/// An image's process configuration (the OCI image config's `config`
/// object: Entrypoint, Cmd, Env, WorkingDir, User), taken as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`: the program and its fixed arguments.
    pub entrypoint: Vec<String>,
    /// `Cmd`: default arguments (or the command, without an entrypoint).
    pub cmd: Vec<String>,
    /// `Env`: `NAME=value` entries, in order.
    pub env: Vec<String>,
    /// `WorkingDir`; `None` (or empty) means `/`.
    pub working_dir: Option<String>,
    /// `User`: `user`, `uid`, `user:group` or `uid:gid`; `None` means root.
    pub user: Option<String>,
}

impl ImageConfig {
    /// The argument vector to execute, as `docker run` builds it: the
    /// entrypoint followed by `override_cmd` if it is not empty, else by
    /// the image's `Cmd`. Empty if the image names no program and none is
    /// given.
    pub fn process_args(&self, override_cmd: &[String]) -> Vec<String> {
        let tail = if override_cmd.is_empty() {
            &self.cmd
        } else {
            override_cmd
        };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }

    /// The working directory, `/` when the image sets none.
    pub fn working_dir(&self) -> &str {
        match self.working_dir.as_deref() {
            Some(d) if !d.is_empty() => d,
            _ => "/",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn args_follow_docker_run_rules() {
        let c = ImageConfig {
            entrypoint: s(&["/bin/app"]),
            cmd: s(&["--default"]),
            ..Default::default()
        };
        assert_eq!(c.process_args(&[]), s(&["/bin/app", "--default"]));
        assert_eq!(c.process_args(&s(&["x"])), s(&["/bin/app", "x"]));
        let c = ImageConfig {
            cmd: s(&["sh"]),
            ..Default::default()
        };
        assert_eq!(c.process_args(&s(&["uname", "-r"])), s(&["uname", "-r"]));
        assert_eq!(
            ImageConfig::default().process_args(&[]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn working_dir_defaults_to_root() {
        assert_eq!(ImageConfig::default().working_dir(), "/");
        let c = ImageConfig {
            working_dir: Some("/srv".into()),
            ..Default::default()
        };
        assert_eq!(c.working_dir(), "/srv");
    }
}
