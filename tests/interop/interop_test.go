package interop

// Drop-in compatibility against the real upstream implementation (pinned in
// go.mod): the client library kube-apiserver embeds, the upstream agent and
// the upstream server, paired with our proxy-server and proxy-agent.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"sigs.k8s.io/apiserver-network-proxy/konnectivity-client/pkg/client"
)

const mib = 1 << 20

const (
	srvReady    = "konnectivity_network_proxy_server_ready_backend_connections"
	srvPending  = "konnectivity_network_proxy_server_pending_backend_dials"
	srvConns    = "konnectivity_network_proxy_server_established_connections"
	agentDials  = "konnectivity_network_proxy_agent_dial_duration_seconds_count"
	agentOpen   = "konnectivity_network_proxy_agent_open_endpoint_connections"
	agentServer = "konnectivity_network_proxy_agent_open_server_connections"
	agentPend   = "konnectivity_network_proxy_agent_pending_endpoint_dials"
)

// kasDial dials addr the way kube-apiserver's egress selector does in gRPC
// mode: a single-use tunnel over the Unix socket, one dial per tunnel.
func kasDial(ctx context.Context, uds, addr string) (net.Conn, error) {
	udsDialer := func(ctx context.Context, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", uds)
	}
	tunnel, err := client.CreateSingleUseGrpcTunnelWithContext(ctx, context.Background(), uds,
		grpc.WithContextDialer(udsDialer),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	return tunnel.DialContext(ctx, "tcp", addr)
}

func mustDial(t *testing.T, uds, addr string) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := kasDial(ctx, uds, addr)
	if err != nil {
		t.Fatalf("dial %s through %s: %v", addr, uds, err)
	}
	return c
}

func httpGet(t *testing.T, c net.Conn) string {
	t.Helper()
	defer c.Close()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: dest\r\n\r\n")
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	return string(b)
}

func download(t *testing.T, uds, dst string, n int, seed int64) {
	t.Helper()
	c := mustDial(t, uds, dst)
	defer c.Close()
	fmt.Fprintf(c, "GET %d %d\n", n, seed)
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("download: %v", err)
	}
	if len(got) != n || sha(got) != sha(pattern(n, seed)) {
		t.Fatalf("download: got %d bytes (sha %s), want %d", len(got), sha(got), n)
	}
}

func upload(t *testing.T, uds, dst string, n int, seed int64) {
	t.Helper()
	c := mustDial(t, uds, dst)
	defer c.Close()
	data := pattern(n, seed)
	fmt.Fprintf(c, "PUT %d\n", n)
	go func() {
		for off := 0; off < len(data); off += 256 * 1024 {
			end := off + 256*1024
			if end > len(data) {
				end = len(data)
			}
			if _, err := c.Write(data[off:end]); err != nil {
				return
			}
		}
	}()
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("upload answer: %v", err)
	}
	if strings.TrimSpace(line) != sha(data) {
		t.Fatalf("upload: destination saw sha %s, want %s", strings.TrimSpace(line), sha(data))
	}
}

// Case 1: kube-apiserver's client -> our server (Unix socket) -> our agent.
func TestUpstreamClientThroughOurServerAndAgent(t *testing.T) {
	p := newPKI(t)
	s := startOurServer(t, p, "grpc")
	_, agentHealth := startOurAgent(t, p, s.agent, "our-agent")
	waitMetric(t, s.health, srvReady, 1)
	dst := bulkServer(t, "127.0.0.1", "bulk")

	t.Run("get", func(t *testing.T) {
		resp := httpGet(t, mustDial(t, s.uds, dst))
		if !strings.HasPrefix(resp, "HTTP/1.1 200 OK") || !strings.HasSuffix(resp, "bulk") {
			t.Fatalf("response %q", resp)
		}
	})
	t.Run("20MiB down", func(t *testing.T) { download(t, s.uds, dst, 20*mib, 11) })
	t.Run("20MiB up", func(t *testing.T) { upload(t, s.uds, dst, 20*mib, 12) })
	t.Run("closed port is an endpoint error", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := kasDial(ctx, s.uds, closedPort(t))
		if err == nil || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("want a connection refused error, got %v", err)
		}
		if ok, reason := client.GetDialFailureReason(err); !ok || reason != "endpoint" {
			t.Fatalf("client classifies it as %v/%q, want an endpoint dial failure", ok, reason)
		}
	})
	t.Run("cancelled dial is cleaned up on server and agent", func(t *testing.T) {
		hang := hangingDestination(t)
		ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
		defer cancel()
		go func() {
			// While the dial hangs, both sides hold it as pending.
			eventually(t, 10*time.Second, "pending dial", func() bool {
				return metric(s.health, srvPending) == 1 && metric(agentHealth, agentPend) == 1
			})
		}()
		_, err := kasDial(ctx, s.uds, hang)
		if err == nil {
			t.Fatal("dial to a hanging destination must fail when its context ends")
		}
		// The client sent DIAL_CLS: the server forgets the dial and the agent aborts it.
		waitMetric(t, s.health, srvPending, 0)
		waitMetric(t, agentHealth, agentPend, 0)
		waitMetric(t, agentHealth, agentOpen, 0)
	})
	t.Run("50 concurrent tunnels", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 50)
		for i := 0; i < 50; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				c, err := kasDial(ctx, s.uds, dst)
				if err != nil {
					errs <- err
					return
				}
				defer c.Close()
				n := 100*1024 + i*31
				fmt.Fprintf(c, "GET %d %d\n", n, i)
				got, err := io.ReadAll(c)
				if err != nil || !bytes.Equal(got, pattern(n, int64(i))) {
					errs <- fmt.Errorf("tunnel %d: %d bytes, err %v", i, len(got), err)
				}
			}(i)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
	t.Run("Close returns promptly", func(t *testing.T) {
		echo := bulkServer(t, "127.0.0.1", "idle")
		c := mustDial(t, s.uds, echo)
		start := time.Now()
		c.Close()
		// The client waits up to 10 s for CLOSE_RSP; a prompt answer returns at once.
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("Close took %v: no CLOSE_RSP", d)
		}
		waitMetric(t, s.health, srvConns, 0)
	})
}

// Case 2: the upstream agent behind our server, in both frontend modes.
func TestUpstreamAgentBehindOurServer(t *testing.T) {
	p := newPKI(t)
	s := startOurServer(t, p, "grpc", "--proxy-strategies=destHost,default")
	a1, h1 := startUpstreamAgent(t, p, s.agent, "go-agent-1", "--agent-identifiers=ipv4=127.0.0.2")
	_, h2 := startUpstreamAgent(t, p, s.agent, "go-agent-2", "--agent-identifiers=ipv4=127.0.0.3")
	waitMetric(t, s.health, srvReady, 2)
	onA1 := bulkServer(t, "127.0.0.2", "a1")
	onA2 := bulkServer(t, "127.0.0.3", "a2")
	elsewhere := bulkServer(t, "127.0.0.4", "x")

	t.Run("get and bulk", func(t *testing.T) {
		resp := httpGet(t, mustDial(t, s.uds, elsewhere))
		if !strings.HasSuffix(resp, "x") {
			t.Fatalf("response %q", resp)
		}
		download(t, s.uds, elsewhere, 20*mib, 21)
		upload(t, s.uds, elsewhere, 20*mib, 22)
	})
	t.Run("destHost routes by the Go agent's identifiers", func(t *testing.T) {
		b1, b2 := metric(h1, agentDials), metric(h2, agentDials)
		for i := 0; i < 5; i++ {
			httpGet(t, mustDial(t, s.uds, onA1))
			httpGet(t, mustDial(t, s.uds, onA2))
		}
		if d1, d2 := metric(h1, agentDials)-b1, metric(h2, agentDials)-b2; d1 != 5 || d2 != 5 {
			t.Fatalf("dials: go-agent-1 %v, go-agent-2 %v; want 5 each", d1, d2)
		}
	})
	t.Run("DRAIN on SIGTERM moves new dials away", func(t *testing.T) {
		a1.signal(syscall.SIGTERM)
		// The upstream agent sends DRAIN from its receive loop, i.e. only once
		// its stream carries another packet: keep dialing until the server
		// has seen it.
		eventually(t, 30*time.Second, "DRAIN from go-agent-1", func() bool {
			httpGet(t, mustDial(t, s.uds, elsewhere))
			for _, l := range s.logs() {
				if strings.Contains(l, "agent is draining") && strings.Contains(l, "go-agent-1") {
					return true
				}
			}
			return false
		})
		b2 := metric(h2, agentDials)
		for i := 0; i < 5; i++ {
			httpGet(t, mustDial(t, s.uds, elsewhere))
		}
		if d2 := metric(h2, agentDials) - b2; d2 != 5 {
			t.Fatalf("go-agent-2 took %v of 5 new dials", d2)
		}
	})

	t.Run("http-connect mode", func(t *testing.T) {
		hc := startOurServer(t, p, "http-connect")
		startUpstreamAgent(t, p, hc.agent, "go-agent-3")
		waitMetric(t, hc.health, srvReady, 1)
		c, err := net.Dial("unix", hc.uds)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", elsewhere)
		want := "HTTP/1.1 200 Connection Established\r\n\r\n"
		head := make([]byte, len(want))
		if _, err := io.ReadFull(c, head); err != nil || string(head) != want {
			t.Fatalf("CONNECT answer %q, %v", head, err)
		}
		if resp := httpGet(t, c); !strings.HasSuffix(resp, "x") {
			t.Fatalf("response %q", resp)
		}
	})
}

// Case 3: our agent behind the upstream server; with three upstream servers
// behind one address, our agent ends up holding all three.
func TestOurAgentBehindUpstreamServer(t *testing.T) {
	p := newPKI(t)
	us := startUpstreamServer(t, p, "grpc", "go-server")
	_, agentHealth := startOurAgent(t, p, us.agent, "our-agent")
	waitMetric(t, agentHealth, agentServer, 1)
	eventually(t, 30*time.Second, "upstream server ready", func() bool { return httpStatus(us.health, "/readyz") == 200 })
	dst := bulkServer(t, "127.0.0.1", "bulk")

	resp := httpGet(t, mustDial(t, us.uds, dst))
	if !strings.HasSuffix(resp, "bulk") {
		t.Fatalf("response %q", resp)
	}
	download(t, us.uds, dst, 20*mib, 31)
	upload(t, us.uds, dst, 20*mib, 32)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := kasDial(ctx, us.uds, closedPort(t)); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("want connection refused, got %v", err)
	}

	t.Run("server-count 3 behind one address", func(t *testing.T) {
		var backends []string
		for i := 0; i < 3; i++ {
			s := startUpstreamServer(t, p, "grpc", fmt.Sprintf("ha-%d", i), "--server-count=3")
			backends = append(backends, s.agent)
		}
		lb := roundRobin(t, backends)
		_, h := startOurAgent(t, p, lb, "ha-agent")
		waitMetric(t, h, agentServer, 3)
	})
}

// roundRobin is a TCP balancer: each new connection goes to the next backend.
func roundRobin(t *testing.T, backends []string) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for i := 0; ; i++ {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn, backend string) {
				defer c.Close()
				b, err := net.Dial("tcp", backend)
				if err != nil {
					return
				}
				defer b.Close()
				go io.Copy(b, c)
				io.Copy(c, b)
			}(c, backends[i%len(backends)])
		}
	}()
	return l.Addr().String()
}

// Case 5: HTTP CONNECT as kube-apiserver sends it over the Unix socket, and
// curl using our mutual-TLS TCP listener as an HTTPS proxy.
func TestHTTPConnectExactlyAsClientsSendIt(t *testing.T) {
	p := newPKI(t)
	uds := startOurServer(t, p, "http-connect")
	startOurAgent(t, p, uds.agent, "agent-uds")
	waitMetric(t, uds.health, srvReady, 1)
	dst := bulkServer(t, "127.0.0.1", "through-connect")

	c, err := net.Dial("unix", uds.uds)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", dst)
	want := "HTTP/1.1 200 Connection Established\r\n\r\n"
	head := make([]byte, len(want))
	if _, err := io.ReadFull(c, head); err != nil || string(head) != want {
		t.Fatalf("CONNECT answer %q, %v", head, err)
	}
	// Nothing may follow the head before tunnel data.
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, _ := c.Read(make([]byte, 1)); n != 0 {
		t.Fatal("bytes after the 200 line before any tunnel data")
	}
	c.SetReadDeadline(time.Time{})
	if resp := httpGet(t, c); !strings.HasSuffix(resp, "through-connect") {
		t.Fatalf("response %q", resp)
	}

	// Mutual-TLS TCP listener, used by curl as an HTTPS proxy.
	tcp := startOurServer(t, p, "http-connect", "--uds-name=", "--server-port=0", "--server-bind-address=127.0.0.1",
		"--server-cert="+p.serverCert, "--server-key="+p.serverKey, "--server-ca-cert="+p.ca)
	startOurAgent(t, p, tcp.agent, "agent-tcp")
	waitMetric(t, tcp.health, srvReady, 1)
	front := strings.TrimSuffix(strings.TrimPrefix(tcp.front, "Tcp("), ")")
	out, err := exec.Command("curl", "-sS", "--max-time", "20", "-p",
		"--proxy", "https://"+front,
		"--proxy-cacert", p.ca, "--proxy-cert", p.clientCert, "--proxy-key", p.clientKey,
		"http://"+dst+"/").CombinedOutput()
	if err != nil || string(out) != "through-connect" {
		t.Fatalf("curl through the proxy: %v: %s", err, out)
	}
	// Without a client certificate the TLS listener refuses.
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(p.ca)
	pool.AppendCertsFromPEM(caPEM)
	conn, err := tls.Dial("tcp", front, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	if err == nil {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil {
		t.Fatal("a client without a certificate must be refused")
	}
}
