package client037

// Minimal harness: certificates, our two binaries, destinations on 127.0.0.1
// and metric reads. Every wait is bounded.

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const (
	srvReady    = "konnectivity_network_proxy_server_ready_backend_connections"
	srvPending  = "konnectivity_network_proxy_server_pending_backend_dials"
	srvConns    = "konnectivity_network_proxy_server_established_connections"
	srvStreams  = "konnectivity_network_proxy_server_frontend_connections"
	agentOpen   = "konnectivity_network_proxy_agent_open_endpoint_connections"
	agentPend   = "konnectivity_network_proxy_agent_pending_endpoint_dials"
	agentServer = "konnectivity_network_proxy_agent_open_server_connections"
)

// binPath finds one of our binaries: $KNP_BIN_DIR, else ../../../target/debug.
func binPath(t testing.TB, name string) string {
	dir := os.Getenv("KNP_BIN_DIR")
	if dir == "" {
		dir = filepath.Join("..", "..", "..", "target", "debug")
	}
	p, err := filepath.Abs(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s not built: %v", p, err)
	}
	return p
}

// logArgs: --log-format=json, plus --v=$INTEROP_V when set (RUST_LOG is
// inherited by the children and overrides it).
func logArgs() []string {
	a := []string{"--log-format=json"}
	if v := os.Getenv("INTEROP_V"); v != "" {
		a = append(a, "--v="+v)
	}
	return a
}

// --- certificates ----------------------------------------------------------

type pki struct {
	dir, ca, serverCert, serverKey, agentCert, agentKey string
}

func newPKI(t testing.TB) *pki {
	dir := t.TempDir()
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "client037 CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	p := &pki{dir: dir, ca: write("ca.crt", "CERTIFICATE", caDER)}
	leaf := func(name string, serial int64) (string, string) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			DNSNames: []string{"localhost", "kubernetes"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalPKCS8PrivateKey(key)
		return write(name+".crt", "CERTIFICATE", der), write(name+".key", "PRIVATE KEY", kder)
	}
	p.serverCert, p.serverKey = leaf("server", 2)
	p.agentCert, p.agentKey = leaf("agent", 3)
	return p
}

// --- processes -------------------------------------------------------------

type proc struct {
	name   string
	cmd    *exec.Cmd
	exited chan struct{}
	mu     sync.Mutex
	log    []string
}

func startProc(t testing.TB, name, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...), exited: make(chan struct{})}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stdout = p.cmd.Stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		s := bufio.NewScanner(stderr)
		s.Buffer(make([]byte, 1<<20), 1<<20)
		for s.Scan() {
			p.mu.Lock()
			p.log = append(p.log, s.Text())
			p.mu.Unlock()
			if os.Getenv("INTEROP_LOGS") != "" {
				fmt.Fprintf(os.Stderr, "[%s] %s\n", name, s.Text())
			}
		}
		_ = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.kill(t)
		if t.Failed() {
			for _, l := range p.logs() {
				t.Logf("[%s] %s", name, l)
			}
		}
	})
	return p
}

// kill sends SIGKILL and waits (bounded) for the process to be reaped.
func (p *proc) kill(t testing.TB) {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		t.Errorf("%s did not exit within 10s of SIGKILL", p.name)
	}
}

func (p *proc) logs() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.log...)
}

func (p *proc) waitLog(t testing.TB, needle string) string {
	t.Helper()
	var found string
	eventually(t, 30*time.Second, p.name+" log "+strconv.Quote(needle), func() bool {
		for _, l := range p.logs() {
			if strings.Contains(l, needle) {
				found = l
				return true
			}
		}
		return false
	})
	return found
}

func eventually(t testing.TB, limit time.Duration, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", limit, what)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// --- our binaries ----------------------------------------------------------

type server struct {
	*proc
	uds, agent, health string
}

// startServer runs proxy-server --mode=grpc on uds; agentPort 0 picks one.
// The bound addresses come from the JSON "proxy-server started" line.
func startServer(t testing.TB, p *pki, uds string, agentPort int) *server {
	t.Helper()
	args := append([]string{
		"--mode=grpc", "--uds-name=" + uds, "--delete-existing-uds-file=true",
		"--agent-port=" + strconv.Itoa(agentPort), "--agent-bind-address=127.0.0.1",
		"--health-port=0", "--health-bind-address=127.0.0.1",
		"--admin-port=0", "--admin-bind-address=127.0.0.1",
		"--cluster-cert=" + p.serverCert, "--cluster-key=" + p.serverKey,
	}, logArgs()...)
	s := &server{proc: startProc(t, "server", binPath(t, "proxy-server"), args...), uds: uds}
	line := s.waitLog(t, "proxy-server started")
	var v struct {
		Fields map[string]any `json:"fields"`
	}
	if err := json.Unmarshal([]byte(line), &v); err != nil {
		t.Fatalf("start line %q: %v", line, err)
	}
	s.agent, _ = v.Fields["agent"].(string)
	s.health, _ = v.Fields["health"].(string)
	if s.agent == "" || s.health == "" {
		t.Fatalf("start line without agent/health address: %q", line)
	}
	return s
}

// startAgent runs proxy-agent against server and returns its health address.
func startAgent(t testing.TB, p *pki, serverAgentAddr string) (*proc, string) {
	t.Helper()
	host, port, _ := net.SplitHostPort(serverAgentAddr)
	hport := strconv.Itoa(freePort(t))
	args := append([]string{
		"--proxy-server-host=" + host, "--proxy-server-port=" + port,
		"--ca-cert=" + p.ca, "--agent-cert=" + p.agentCert, "--agent-key=" + p.agentKey,
		"--agent-id=agent-1", "--health-server-host=127.0.0.1", "--health-server-port=" + hport,
		"--admin-server-port=" + strconv.Itoa(freePort(t)),
		"--sync-interval=100ms", "--sync-interval-cap=1s",
	}, logArgs()...)
	return startProc(t, "agent", binPath(t, "proxy-agent"), args...), "127.0.0.1:" + hport
}

// setup starts a server and an agent and waits until the agent is ready.
func setup(t *testing.T) (*pki, *server, string) {
	t.Helper()
	p := newPKI(t)
	s := startServer(t, p, filepath.Join(p.dir, "konnectivity.sock"), 0)
	_, agentHealth := startAgent(t, p, s.agent)
	waitMetric(t, s.health, srvReady, 1, 30*time.Second)
	return p, s, agentHealth
}

// --- dialing as kube-apiserver does ---------------------------------------

// grpcOpts: the gRPC target is the socket path, reached by a "unix" dialer;
// sockets, if not nil, counts the connections made.
func grpcOpts(uds string, sockets *atomic.Int32) []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			if sockets != nil {
				sockets.Add(1)
			}
			var d net.Dialer
			return d.DialContext(ctx, "unix", uds)
		}),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}
}

// --- metrics ---------------------------------------------------------------

// metric sums every sample of name on addr's /metrics; -1 if unreadable.
func metric(addr, name string) float64 {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, l := range strings.Split(string(body), "\n") {
		rest, ok := strings.CutPrefix(l, name)
		if !ok || !(strings.HasPrefix(rest, " ") || strings.HasPrefix(rest, "{")) {
			continue
		}
		f := strings.Fields(l)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

func waitMetric(t testing.TB, addr, name string, want float64, limit time.Duration) {
	t.Helper()
	last := float64(-2)
	deadline := time.Now().Add(limit)
	for {
		last = metric(addr, name)
		if last == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s on %s is %v after %v, want %v", name, addr, last, limit, want)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// --- destinations ----------------------------------------------------------

func serve(t testing.TB, handle func(net.Conn)) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return l.Addr().String()
}

// httpDest answers every HTTP/1.1 request with 200 and body.
func httpDest(t testing.TB, body string) string {
	return serve(t, func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if l == "\r\n" {
				break
			}
		}
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
	})
}

// echoDest copies everything back.
func echoDest(t testing.TB) string {
	return serve(t, func(c net.Conn) { _, _ = io.Copy(c, c) })
}

// hangingDest: a listener whose zero backlog is already full, so new TCP
// handshakes never complete.
func hangingDest(t testing.TB) string {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	var fill []net.Conn
	for i := 0; i < 4; i++ {
		c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		if err != nil {
			break
		}
		fill = append(fill, c)
	}
	t.Cleanup(func() {
		for _, c := range fill {
			c.Close()
		}
		syscall.Close(fd)
	})
	return addr
}

// randomBytes returns n bytes from a seeded source.
func randomBytes(n int, seed int64) []byte {
	b := make([]byte, n)
	mrand.New(mrand.NewSource(seed)).Read(b)
	return b
}

// within runs f and returns its error, or an error if f has not returned
// after limit (f keeps running; it must not touch t).
func within(limit time.Duration, what string, f func() error) error {
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(limit):
		return fmt.Errorf("%s did not finish within %v", what, limit)
	}
}
