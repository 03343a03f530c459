//! [`LauncherClient`]: the typed REST client.

use std::time::Duration;

use clawos_api::{ClientError, HttpClient, Route};

use crate::{
    CONSOLE_OFFSET_HEADER, ConsoleQuery, CreateSnapshot, FileEntry, FileQuery, ImageInfo,
    RestoreVm, Snapshot, StartVm, Vm, routes,
};

/// A typed client for the launcher.
#[derive(Debug, Clone)]
pub struct LauncherClient {
    pub(crate) http: HttpClient,
    /// TLS for `wss://` (exec, gateway) when the routes are served over HTTPS.
    pub(crate) ws_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl LauncherClient {
    /// A client for the launcher at `base` (e.g. `http://127.0.0.1:2080`), without a
    /// credential: only `/healthz` and `/metrics` answer it.
    pub fn new(base: &str) -> Self {
        Self {
            http: HttpClient::new("vm-launcher", base),
            ws_tls: None,
        }
    }

    /// A client of the launcher's routes wherever they are served: the local launcher,
    /// or a control plane (`https://host:8080/api`) over `http`, a client that trusts
    /// that server's certificate. `service` names it in errors.
    pub fn with_http(service: &'static str, base: &str, http: reqwest::Client) -> Self {
        Self {
            http: HttpClient::with_http(service, base, http),
            ws_tls: None,
        }
    }

    /// Uses `tls` for the WebSocket routes (exec, gateway) over `wss://`: the same
    /// trust as the HTTPS client given to [`LauncherClient::with_http`].
    #[must_use]
    pub fn with_ws_tls(self, tls: std::sync::Arc<rustls::ClientConfig>) -> Self {
        Self {
            ws_tls: Some(tls),
            ..self
        }
    }

    /// Sends the operator credential (the content of [`crate::token_path`]) with every
    /// request, WebSocket upgrades included.
    #[must_use]
    pub fn with_token(self, token: &str) -> Self {
        Self {
            http: self.http.with_token(token),
            ws_tls: self.ws_tls,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        self.http.base()
    }

    /// Creates (if new) and starts a VM.
    pub async fn start(&self, req: &StartVm) -> Result<Vm, ClientError> {
        self.http
            .json(self.http.request(routes::START, &[]).json(req))
            .await
    }

    /// Lists VMs.
    pub async fn list(&self) -> Result<Vec<Vm>, ClientError> {
        self.http.json(self.http.request(routes::LIST, &[])).await
    }

    /// One VM.
    pub async fn get(&self, name: &str) -> Result<Vm, ClientError> {
        self.http
            .json(self.http.request(routes::GET, &[name]))
            .await
    }

    /// Stops a VM and waits until it is stopped.
    pub async fn stop(&self, name: &str) -> Result<Vm, ClientError> {
        self.http
            .json(
                self.http
                    .request(routes::STOP, &[name])
                    .timeout(Duration::from_secs(120)),
            )
            .await
    }

    /// Deletes a stopped VM and its disks.
    pub async fn delete(&self, name: &str) -> Result<(), ClientError> {
        self.send(routes::DELETE, &[name]).await
    }

    /// Freezes a running VM.
    pub async fn pause(&self, name: &str) -> Result<Vm, ClientError> {
        self.http
            .json(self.http.request(routes::PAUSE, &[name]))
            .await
    }

    /// Resumes a paused VM.
    pub async fn resume(&self, name: &str) -> Result<Vm, ClientError> {
        self.http
            .json(self.http.request(routes::RESUME, &[name]))
            .await
    }

    /// Snapshots a running or paused VM (it keeps its state afterwards).
    pub async fn snapshot(
        &self,
        name: &str,
        req: &CreateSnapshot,
    ) -> Result<Snapshot, ClientError> {
        self.http
            .json(
                self.http
                    .request(routes::CREATE_SNAPSHOT, &[name])
                    .timeout(Duration::from_secs(600))
                    .json(req),
            )
            .await
    }

    /// A VM's snapshots, oldest first.
    pub async fn snapshots(&self, name: &str) -> Result<Vec<Snapshot>, ClientError> {
        self.http
            .json(self.http.request(routes::LIST_SNAPSHOTS, &[name]))
            .await
    }

    /// Deletes one snapshot.
    pub async fn delete_snapshot(&self, name: &str, tag: &str) -> Result<(), ClientError> {
        self.send(routes::DELETE_SNAPSHOT, &[name, tag]).await
    }

    /// Boots a stopped VM from a snapshot; its disks return to the snapshot's.
    pub async fn restore(&self, name: &str, req: &RestoreVm) -> Result<Vm, ClientError> {
        self.http
            .json(
                self.http
                    .request(routes::RESTORE, &[name])
                    .timeout(Duration::from_secs(600))
                    .json(req),
            )
            .await
    }

    /// The images VMs may boot, each verified as the launcher lists them.
    pub async fn images(&self) -> Result<Vec<ImageInfo>, ClientError> {
        self.http.json(self.http.request(routes::IMAGES, &[])).await
    }

    /// Verifies image `name` as a boot would: its facts, or the refusal (422).
    pub async fn verify_image(&self, name: &str) -> Result<ImageInfo, ClientError> {
        self.http
            .json(
                self.http
                    .request(routes::VERIFY_IMAGE, &[name])
                    .timeout(Duration::from_secs(120)),
            )
            .await
    }

    /// Uploads `data` to `path` in the VM's workspace.
    pub async fn put_file(&self, name: &str, path: &str, data: Vec<u8>) -> Result<(), ClientError> {
        let len = data.len() as u64;
        self.upload(name, path, len, reqwest::Body::from(data))
            .await
    }

    /// Uploads the `len` bytes `file` holds from its current position to `path` in the
    /// VM's workspace, streamed: the file is never held in memory. A file that grows
    /// or shrinks meanwhile fails the upload, and the guest keeps nothing.
    pub async fn put_file_from(
        &self,
        name: &str,
        path: &str,
        file: tokio::fs::File,
        len: u64,
    ) -> Result<(), ClientError> {
        use tokio::io::AsyncReadExt;
        let chunks = futures_util::stream::unfold(file, |mut f| async move {
            let mut buf = vec![0u8; 256 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok::<_, std::io::Error>(buf), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        self.upload(name, path, len, reqwest::Body::wrap_stream(chunks))
            .await
    }

    /// Uploads `len` bytes from `body` to `path` in the VM's workspace, streamed (a
    /// relay passes an upload on with it). A body that is not `len` bytes fails the
    /// upload, and the guest keeps nothing.
    pub async fn upload(
        &self,
        name: &str,
        path: &str,
        len: u64,
        body: reqwest::Body,
    ) -> Result<(), ClientError> {
        let q = FileQuery {
            path: path.to_owned(),
            list: false,
        };
        self.http
            .send(
                self.http
                    .request(routes::PUT_FILE, &[name])
                    .query(&q)
                    .header(reqwest::header::CONTENT_TYPE, crate::UPLOAD_CONTENT_TYPE)
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(body),
            )
            .await
            .map(drop)
    }

    /// Downloads `path` from the VM's workspace into memory. For files of any size,
    /// [`LauncherClient::download`] streams instead.
    pub async fn get_file(&self, name: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut d = self.download(name, path).await?;
        let mut out = Vec::new();
        while let Some(chunk) = d.chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Starts downloading `path` from the VM's workspace: the launcher has accepted
    /// (the file exists and may be read), the bytes follow with [`Download::chunk`].
    pub async fn download(&self, name: &str, path: &str) -> Result<Download, ClientError> {
        let q = FileQuery {
            path: path.to_owned(),
            list: false,
        };
        let resp = self
            .http
            .send(self.http.request(routes::GET_FILE, &[name]).query(&q))
            .await?;
        Ok(Download {
            size: resp.content_length(),
            resp,
            base: self.http.base().to_owned(),
        })
    }
    /// Lists a directory in the VM's workspace.
    pub async fn list_files(&self, name: &str, path: &str) -> Result<Vec<FileEntry>, ClientError> {
        let q = FileQuery {
            path: path.to_owned(),
            list: true,
        };
        self.http
            .json(self.http.request(routes::GET_FILE, &[name]).query(&q))
            .await
    }

    /// The WebSocket URL of a VM's exec endpoint.
    pub fn exec_url(&self, name: &str) -> String {
        self.http.ws_url(routes::EXEC, &[name])
    }

    /// The WebSocket URL of a VM's gateway tunnel.
    pub fn gateway_url(&self, name: &str) -> String {
        self.http.ws_url(routes::GATEWAY, &[name])
    }

    /// Console output from byte `offset`; returns the bytes and the next offset.
    pub async fn console(&self, name: &str, offset: u64) -> Result<(Vec<u8>, u64), ClientError> {
        let resp = self
            .http
            .send(
                self.http
                    .request(routes::CONSOLE, &[name])
                    .query(&ConsoleQuery { offset }),
            )
            .await?;
        let next = resp
            .headers()
            .get(CONSOLE_OFFSET_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(offset);
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                service: "vm-launcher",
                url: self.http.base().to_owned(),
                source,
            })?;
        Ok((bytes.to_vec(), next))
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let bytes = self
            .http
            .bytes(self.http.request(routes::METRICS, &[]))
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn send(&self, route: Route, args: &[&str]) -> Result<(), ClientError> {
        self.http
            .send(self.http.request(route, args))
            .await
            .map(drop)
    }
}

/// A file coming from a VM, read chunk by chunk.
#[derive(Debug)]
pub struct Download {
    resp: reqwest::Response,
    size: Option<u64>,
    base: String,
}

impl Download {
    /// The size the launcher announced (`Content-Length`), before any byte is read.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The next bytes, or `None` at the end. A connection that ends before the
    /// announced size is an error, not an end.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        self.resp
            .chunk()
            .await
            .map(|c| c.map(|b| b.to_vec()))
            .map_err(|source| ClientError::Transport {
                service: "vm-launcher",
                url: self.base.clone(),
                source,
            })
    }
}
