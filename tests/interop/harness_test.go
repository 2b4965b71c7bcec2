package interop

// Test harness: certificates, processes (our Rust binaries and the upstream Go
// binaries built from the pinned modules), destinations and metric reads.

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
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
	"syscall"
	"testing"
	"time"
)

var upstreamBinDir string

// TestMain builds the upstream agent and server from the pinned module.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "knp-upstream-")
	if err != nil {
		panic(err)
	}
	upstreamBinDir = dir
	for name, pkg := range map[string]string{
		"upstream-agent":  "sigs.k8s.io/apiserver-network-proxy/cmd/agent",
		"upstream-server": "sigs.k8s.io/apiserver-network-proxy/cmd/server",
	} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, name), pkg)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n", pkg, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func ourBin(t testing.TB, name string) string {
	dir := os.Getenv("KNP_BIN_DIR")
	if dir == "" {
		dir = filepath.Join("..", "..", "target", "debug")
	}
	p, err := filepath.Abs(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s not built (cargo build --workspace --bins): %v", p, err)
	}
	return p
}

func upstreamBin(name string) string { return filepath.Join(upstreamBinDir, name) }

// --- certificates ----------------------------------------------------------

type pki struct {
	dir                   string
	ca                    string
	serverCert, serverKey string
	clientCert, clientKey string
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func newPKI(t testing.TB) *pki {
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "interop CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	p := &pki{dir: dir, ca: filepath.Join(dir, "ca.crt")}
	writePEM(t, p.ca, "CERTIFICATE", caDER)
	leaf := func(name string, serial int64) (string, string) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: name},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(24 * time.Hour),
			DNSNames:     []string{"localhost", "kubernetes"},
			IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalPKCS8PrivateKey(key)
		c, k := filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
		writePEM(t, c, "CERTIFICATE", der)
		writePEM(t, k, "PRIVATE KEY", kder)
		return c, k
	}
	p.serverCert, p.serverKey = leaf("server", 2)
	p.clientCert, p.clientKey = leaf("client", 3)
	return p
}

// --- processes -------------------------------------------------------------

type proc struct {
	name string
	cmd  *exec.Cmd
	mu   sync.Mutex
	log  []string
}

func startProc(t testing.TB, name, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...)}
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
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		_, _ = p.cmd.Process.Wait()
		if t.Failed() {
			p.mu.Lock()
			for _, l := range p.log {
				t.Logf("[%s] %s", name, l)
			}
			p.mu.Unlock()
		}
	})
	return p
}

func (p *proc) signal(sig syscall.Signal) { _ = p.cmd.Process.Signal(sig) }

func (p *proc) logs() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.log...)
}

// waitLog returns the first log line containing every needle.
func (p *proc) waitLog(t testing.TB, needles ...string) string {
	t.Helper()
	var found string
	eventually(t, 30*time.Second, fmt.Sprintf("%s log %q", p.name, needles), func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, l := range p.log {
			ok := true
			for _, n := range needles {
				ok = ok && strings.Contains(l, n)
			}
			if ok {
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

// freePort returns a port in [20000, 32000) that is free now (upstream
// binaries refuse port 0 and ephemeral ports).
func freePort(t testing.TB) int {
	for i := 0; i < 200; i++ {
		port := 20000 + mrand.Intn(12000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			l.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

// --- our binaries ----------------------------------------------------------

type ourServer struct {
	*proc
	uds    string
	agent  string
	health string
	front  string
}

// startOurServer runs our proxy-server on port 0 everywhere and reads the bound
// addresses from its start-up log line.
func startOurServer(t testing.TB, p *pki, mode string, extra ...string) *ourServer {
	uds := filepath.Join(p.dir, fmt.Sprintf("our-%d.sock", mrand.Int63()))
	args := []string{
		"--mode=" + mode, "--uds-name=" + uds, "--delete-existing-uds-file=true",
		"--agent-port=0", "--agent-bind-address=127.0.0.1",
		"--health-port=0", "--health-bind-address=127.0.0.1",
		"--admin-port=0", "--admin-bind-address=127.0.0.1",
		"--cluster-cert=" + p.serverCert, "--cluster-key=" + p.serverKey,
		"--log-format=json",
	}
	args = append(args, extra...)
	s := &ourServer{proc: startProc(t, "our-server", ourBin(t, "proxy-server"), args...), uds: uds}
	line := s.waitLog(t, "proxy-server started")
	var v struct {
		Fields map[string]any `json:"fields"`
	}
	if err := json.Unmarshal([]byte(line), &v); err != nil {
		t.Fatalf("start line %q: %v", line, err)
	}
	s.agent, _ = v.Fields["agent"].(string)
	s.health, _ = v.Fields["health"].(string)
	s.front, _ = v.Fields["frontend"].(string)
	return s
}

func startOurAgent(t testing.TB, p *pki, server, id string, extra ...string) (*proc, string) {
	host, port, _ := net.SplitHostPort(server)
	health := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	_, hport, _ := net.SplitHostPort(health)
	args := []string{
		"--proxy-server-host=" + host, "--proxy-server-port=" + port,
		"--ca-cert=" + p.ca, "--agent-cert=" + p.clientCert, "--agent-key=" + p.clientKey,
		"--agent-id=" + id, "--health-server-host=127.0.0.1", "--health-server-port=" + hport,
		"--admin-server-port=" + strconv.Itoa(freePort(t)),
		"--sync-interval=100ms", "--sync-interval-cap=1s",
	}
	args = append(args, extra...)
	return startProc(t, "our-agent-"+id, ourBin(t, "proxy-agent"), args...), health
}

// --- upstream binaries -----------------------------------------------------

func startUpstreamAgent(t testing.TB, p *pki, server, id string, extra ...string) (*proc, string) {
	host, port, _ := net.SplitHostPort(server)
	health := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	_, hport, _ := net.SplitHostPort(health)
	args := []string{
		"--proxy-server-host=" + host, "--proxy-server-port=" + port,
		"--ca-cert=" + p.ca, "--agent-cert=" + p.clientCert, "--agent-key=" + p.clientKey,
		"--agent-id=" + id, "--health-server-host=127.0.0.1", "--health-server-port=" + hport,
		"--admin-server-port=" + strconv.Itoa(freePort(t)), "--admin-bind-address=127.0.0.1",
		"--sync-interval=100ms", "--sync-interval-cap=1s", "--probe-interval=100ms", "--v=2",
	}
	args = append(args, extra...)
	return startProc(t, "upstream-agent-"+id, upstreamBin("upstream-agent"), args...), health
}

type upstreamServer struct {
	*proc
	uds    string
	agent  string
	health string
}

func startUpstreamServer(t testing.TB, p *pki, mode, id string, extra ...string) *upstreamServer {
	uds := filepath.Join(p.dir, fmt.Sprintf("up-%d.sock", mrand.Int63()))
	agentPort, healthPort, adminPort := freePort(t), freePort(t), freePort(t)
	args := []string{
		"--mode=" + mode, "--uds-name=" + uds, "--delete-existing-uds-file=true", "--server-port=0",
		"--agent-port=" + strconv.Itoa(agentPort), "--agent-bind-address=127.0.0.1",
		"--health-port=" + strconv.Itoa(healthPort), "--health-bind-address=127.0.0.1",
		"--admin-port=" + strconv.Itoa(adminPort), "--admin-bind-address=127.0.0.1",
		"--cluster-cert=" + p.serverCert, "--cluster-key=" + p.serverKey,
		"--server-id=" + id, "--v=2",
	}
	args = append(args, extra...)
	s := &upstreamServer{
		proc:   startProc(t, "upstream-server-"+id, upstreamBin("upstream-server"), args...),
		uds:    uds,
		agent:  fmt.Sprintf("127.0.0.1:%d", agentPort),
		health: fmt.Sprintf("127.0.0.1:%d", healthPort),
	}
	eventually(t, 30*time.Second, "upstream server health", func() bool { return httpStatus(s.health, "/healthz") == 200 })
	return s
}

// --- HTTP and metrics ------------------------------------------------------

func httpStatus(addr, path string) int {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// metric sums every sample of `name` (with any labels) on addr's /metrics.
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
		if !strings.HasPrefix(l, name) {
			continue
		}
		rest := l[len(name):]
		if !(strings.HasPrefix(rest, " ") || strings.HasPrefix(rest, "{")) {
			continue
		}
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

func waitMetric(t testing.TB, addr, name string, want float64) {
	t.Helper()
	eventually(t, 30*time.Second, fmt.Sprintf("%s = %v on %s", name, want, addr), func() bool {
		return metric(addr, name) == want
	})
}

// --- destinations ----------------------------------------------------------

// pattern returns n deterministic bytes for seed.
func pattern(n int, seed int64) []byte {
	b := make([]byte, n)
	mrand.New(mrand.NewSource(seed)).Read(b)
	return b
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// bulkServer speaks the harness protocol: "GET n seed\n" -> n bytes;
// "PUT n\n" + n bytes -> sha256 hex; "NAME\n" -> name. HTTP GETs get a 200
// with the name as body.
func bulkServer(t testing.TB, ip, name string) string {
	l, err := net.Listen("tcp", ip+":0")
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
			go func(c net.Conn) {
				defer c.Close()
				r := bufio.NewReader(c)
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				f := strings.Fields(line)
				switch {
				case len(f) == 3 && f[0] == "GET" && strings.HasPrefix(f[2], "HTTP/"):
					for {
						l, err := r.ReadString('\n')
						if err != nil || l == "\r\n" {
							break
						}
					}
					fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(name), name)
				case len(f) == 3 && f[0] == "GET":
					n, _ := strconv.Atoi(f[1])
					seed, _ := strconv.ParseInt(f[2], 10, 64)
					c.Write(pattern(n, seed))
				case len(f) == 2 && f[0] == "PUT":
					n, _ := strconv.Atoi(f[1])
					b := make([]byte, n)
					if _, err := io.ReadFull(r, b); err == nil {
						fmt.Fprintf(c, "%s\n", sha(b))
					}
				case len(f) == 1 && f[0] == "NAME":
					io.WriteString(c, name)
				}
			}(c)
		}
	}()
	return l.Addr().String()
}

func closedPort(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := l.Addr().String()
	l.Close()
	return a
}

// hangingDestination returns an address whose TCP handshake never completes:
// a listener with a zero backlog, already full, that never accepts.
func hangingDestination(t testing.TB) string {
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
