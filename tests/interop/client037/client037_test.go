// Package client037 runs the konnectivity-client v0.37.1 library, which
// kube-apiserver 1.38 links, against our proxy-server (gRPC mode, Unix
// socket) and proxy-agent. v0.37 adds a reusable tunnel: one gRPC ClientConn
// (one HTTP/2 connection), one Proxy stream per DialContext, many at once.
package client037

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"sigs.k8s.io/apiserver-network-proxy/konnectivity-client/pkg/client"
	"sigs.k8s.io/apiserver-network-proxy/konnectivity-client/pkg/client/metrics"
)

func newReusable(t *testing.T, uds string, dials *atomic.Int32) client.ReusableTunnel {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rt, err := client.CreateGRPCTunnel(ctx, uds, grpcOpts(uds, dials)...)
	if err != nil {
		t.Fatalf("CreateGRPCTunnel: %v", err)
	}
	t.Cleanup(func() { _ = within(20*time.Second, "cleanup Close", rt.Close) })
	return rt
}

// closeTunnel closes rt and checks that Close returns and Done fires, bounded.
func closeTunnel(t *testing.T, rt client.ReusableTunnel) {
	t.Helper()
	if err := within(20*time.Second, "ReusableTunnel.Close", rt.Close); err != nil {
		t.Fatal(err)
	}
	select {
	case <-rt.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed after Close returned")
	}
}

func dial(tun client.Tunnel, dst string, limit time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	return tun.DialContext(ctx, "tcp", dst)
}

// httpGet sends one request on c, reads to EOF (the destination closes) and
// checks the answer; c is closed.
func httpGet(c net.Conn, body string) error {
	return within(20*time.Second, "GET", func() error {
		defer c.Close()
		if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: dest\r\n\r\n"); err != nil {
			return fmt.Errorf("write request: %w", err)
		}
		b, err := io.ReadAll(c)
		if err != nil {
			return fmt.Errorf("read response: %w", err)
		}
		if !strings.HasPrefix(string(b), "HTTP/1.1 200 OK") || !strings.HasSuffix(string(b), body) {
			return fmt.Errorf("response %q", b)
		}
		return nil
	})
}

// echo writes data in 16 KiB writes while reading it back, and compares.
func echo(c net.Conn, data []byte) error {
	werr := make(chan error, 1)
	go func() {
		for off := 0; off < len(data); off += 16 << 10 {
			end := min(off+16<<10, len(data))
			if _, err := c.Write(data[off:end]); err != nil {
				werr <- err
				return
			}
		}
		werr <- nil
	}()
	got := make([]byte, len(data))
	if n, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read %d of %d echoed bytes: %w", n, len(data), err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if !bytes.Equal(got, data) {
		i := 0
		for i < len(got) && got[i] == data[i] {
			i++
		}
		return fmt.Errorf("echo differs from byte %d", i)
	}
	return nil
}

// noLeftovers waits until the server holds no dial, connection or frontend
// stream and the agent no endpoint dial or connection.
func noLeftovers(t *testing.T, s *server, agentHealth string, limit time.Duration) {
	t.Helper()
	start := time.Now()
	waitMetric(t, s.health, srvPending, 0, limit)
	waitMetric(t, s.health, srvConns, 0, limit)
	waitMetric(t, s.health, srvStreams, 0, limit)
	waitMetric(t, agentHealth, agentPend, 0, limit)
	waitMetric(t, agentHealth, agentOpen, 0, limit)
	t.Logf("server and agent clean %v after the last connection closed", time.Since(start).Round(time.Millisecond))
}

// 1. The single-use tunnel, as kube-apiserver <= 1.37 uses it.
func TestSingleUseTunnelGet(t *testing.T) {
	_, s, agentHealth := setup(t)
	dst := httpDest(t, "single-use")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tun, err := client.CreateSingleUseGrpcTunnelWithContext(ctx, context.Background(), s.uds, grpcOpts(s.uds, nil)...)
	if err != nil {
		t.Fatalf("CreateSingleUseGrpcTunnelWithContext: %v", err)
	}
	c, err := tun.DialContext(ctx, "tcp", dst)
	if err != nil {
		t.Fatalf("DialContext: %v", err)
	}
	if err := httpGet(c, "single-use"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-tun.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("single-use tunnel not done 15s after its connection closed")
	}
	noLeftovers(t, s, agentHealth, 5*time.Second)
}

// 2. One reusable tunnel, 20 dials one after another.
func TestReusableTunnelSequentialDials(t *testing.T) {
	_, s, agentHealth := setup(t)
	dst := httpDest(t, "reusable")
	var sockets atomic.Int32
	rt := newReusable(t, s.uds, &sockets)
	for i := 0; i < 20; i++ {
		c, err := dial(rt, dst, 15*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		if err := httpGet(c, "reusable"); err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
	}
	if n := sockets.Load(); n != 1 {
		t.Errorf("20 dials used %d Unix-socket connections, want 1", n)
	}
	noLeftovers(t, s, agentHealth, 5*time.Second)
	closeTunnel(t, rt)
	if _, err := dial(rt, dst, 5*time.Second); err == nil {
		t.Fatal("dial after Close succeeded")
	} else if _, reason := client.GetDialFailureReason(err); reason != metrics.DialFailureTunnelClosed {
		t.Fatalf("dial after Close: %v (reason %q), want %q", err, reason, metrics.DialFailureTunnelClosed)
	}
}

// 3. 100 dials at once on one tunnel, 64 KiB echoed on each.
func TestReusableTunnelConcurrentEcho(t *testing.T) {
	_, s, agentHealth := setup(t)
	dst := echoDest(t)
	var sockets atomic.Int32
	rt := newReusable(t, s.uds, &sockets)
	const n = 100
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, err := dial(rt, dst, 30*time.Second)
			if err != nil {
				_, reason := client.GetDialFailureReason(err)
				errs <- fmt.Errorf("conn %d: dial: %v (reason %s)", i, err, reason)
				return
			}
			defer c.Close()
			if err := echo(c, randomBytes(64<<10, int64(i)+1)); err != nil {
				errs <- fmt.Errorf("conn %d: %w", i, err)
			}
		}(i)
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-allDone:
	case <-time.After(90 * time.Second):
		t.Fatalf("100 echo connections not finished within 90s (%d errors so far)", len(errs))
	}
	close(errs)
	failed := 0
	for err := range errs {
		failed++
		if failed <= 10 {
			t.Error(err)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d connections failed", failed, n)
	}
	if c := sockets.Load(); c != 1 {
		t.Errorf("%d Unix-socket connections, want 1", c)
	}
	noLeftovers(t, s, agentHealth, 5*time.Second)
	closeTunnel(t, rt)
}

// 4. Dials cancelled at every point leave nothing on server or agent, and
// the tunnel keeps working.
func TestReusableTunnelCancelledDials(t *testing.T) {
	_, s, agentHealth := setup(t)
	dst := echoDest(t)
	hang := hangingDest(t)
	var sockets atomic.Int32
	rt := newReusable(t, s.uds, &sockets)

	// How long one dial takes here: group A's cancels are spread over twice that.
	start := time.Now()
	c0, err := dial(rt, dst, 15*time.Second)
	if err != nil {
		t.Fatalf("first dial: %v", err)
	}
	dialTime := time.Since(start)
	c0.Close()
	noLeftovers(t, s, agentHealth, 5*time.Second)

	// A bystander: a connection open on the same tunnel throughout, which
	// the cancellations must not disturb.
	bystander, err := dial(rt, dst, 15*time.Second)
	if err != nil {
		t.Fatalf("bystander dial: %v", err)
	}
	defer bystander.Close()

	// The gauges' peaks while the dials run, to show the dials got there.
	var peakSrv, peakAgent atomic.Int64
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stopSampling:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if v := int64(metric(s.health, srvPending)); v > peakSrv.Load() {
				peakSrv.Store(v)
			}
			if v := int64(metric(agentHealth, agentPend)); v > peakAgent.Load() {
				peakAgent.Store(v)
			}
		}
	}()

	var wg sync.WaitGroup
	var cancelledA, establishedA atomic.Int32
	errs := make(chan error, 100)
	// A: 50 dials whose context is cancelled after 0 to 2x a dial's time:
	// before the stream exists, while DIAL_REQ is in flight, or just after
	// DIAL_RSP.
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(dialTime*time.Duration(i)/25, cancel)
			c, err := rt.DialContext(ctx, "tcp", dst)
			cancel()
			if err != nil {
				cancelledA.Add(1)
				return
			}
			establishedA.Add(1)
			c.Close()
		}(i)
	}
	// B: 10 dials to a destination that never answers, cancelled after
	// 300 ms: the server and the agent hold them as pending until DIAL_CLS.
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, err := dial(rt, hang, 300*time.Millisecond)
			if err == nil {
				c.Close()
				errs <- fmt.Errorf("B%d: dial to a hanging destination succeeded", i)
				return
			}
			if _, reason := client.GetDialFailureReason(err); reason != metrics.DialFailureContext {
				errs <- fmt.Errorf("B%d: %v (reason %q), want %q", i, err, reason, metrics.DialFailureContext)
			}
		}(i)
	}
	// C: 20 dials that succeed; the dial context is cancelled, the
	// connection is used, then closed.
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			c, err := rt.DialContext(ctx, "tcp", dst)
			cancel()
			if err != nil {
				errs <- fmt.Errorf("C%d: dial: %v", i, err)
				return
			}
			err = within(20*time.Second, "echo", func() error { return echo(c, randomBytes(1024, int64(i))) })
			c.Close()
			if err != nil {
				errs <- fmt.Errorf("C%d: %v", i, err)
			}
		}(i)
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-allDone:
	case <-time.After(60 * time.Second):
		t.Fatal("dials not finished within 60s")
	}
	close(stopSampling)
	<-sampled
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("one dial took %v; group A: %d cancelled, %d established then closed; peak pending dials: server %d, agent %d",
		dialTime.Round(time.Microsecond), cancelledA.Load(), establishedA.Load(), peakSrv.Load(), peakAgent.Load())
	if peakAgent.Load() == 0 {
		t.Error("the agent never showed a pending dial: group B did not reach it")
	}
	if err := within(15*time.Second, "bystander echo", func() error { return echo(bystander, randomBytes(4096, 7)) }); err != nil {
		t.Errorf("bystander connection after the cancellations: %v", err)
	}
	bystander.Close()
	noLeftovers(t, s, agentHealth, 10*time.Second)

	c, err := dial(rt, dst, 15*time.Second)
	if err != nil {
		t.Fatalf("fresh dial on the same tunnel: %v", err)
	}
	if err := within(15*time.Second, "echo", func() error { return echo(c, randomBytes(4096, 99)) }); err != nil {
		t.Fatalf("fresh dial on the same tunnel: %v", err)
	}
	c.Close()
	if n := sockets.Load(); n != 1 {
		t.Errorf("%d Unix-socket connections, want 1", n)
	}
	noLeftovers(t, s, agentHealth, 5*time.Second)
	closeTunnel(t, rt)
}

// 5. Server restart on the same socket: the old tunnel's connections end,
// it can be closed (Done fires), and a new tunnel works.
func TestReusableTunnelServerRestart(t *testing.T) {
	p, s1, agentHealth := setup(t)
	dst := echoDest(t)
	web := httpDest(t, "after-restart")
	var sockets1 atomic.Int32
	old := newReusable(t, s1.uds, &sockets1)

	c, err := dial(old, dst, 15*time.Second)
	if err != nil {
		t.Fatalf("dial before restart: %v", err)
	}
	if err := within(10*time.Second, "echo", func() error { return echo(c, []byte("before")) }); err != nil {
		t.Fatal(err)
	}
	readErr := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 1))
		readErr <- err
	}()

	_, agentPort, _ := net.SplitHostPort(s1.agent)
	s1.kill(t)

	select {
	case err := <-readErr:
		if err == nil {
			t.Fatal("Read on a connection of the killed server returned data")
		}
		t.Logf("open connection after the kill: Read: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("open connection's Read did not return within 10s of the server kill")
	}
	c.Close()
	waitMetric(t, agentHealth, agentOpen, 0, 10*time.Second)

	_, err = dial(old, dst, 5*time.Second)
	if err == nil {
		t.Fatal("dial on the old tunnel succeeded with the server down")
	}
	_, reason := client.GetDialFailureReason(err)
	t.Logf("old tunnel, server down: dial error %v (reason %q)", err, reason)
	select {
	case <-old.Done():
		t.Log("old tunnel reported Done before Close")
	default:
		t.Log("old tunnel not Done before Close (v0.37.1 fires Done only after Close)")
	}

	port := 0
	fmt.Sscan(agentPort, &port)
	s2 := startServer(t, p, s1.uds, port)
	waitMetric(t, s2.health, srvReady, 1, 30*time.Second)
	waitMetric(t, agentHealth, agentServer, 1, 30*time.Second)

	// The old tunnel: gRPC reconnects its ClientConn after its backoff
	// (informational, tried for up to 5 s); either way Close ends it.
	restarted := time.Now()
	for {
		c, err := dial(old, web, 2*time.Second)
		if err == nil {
			t.Logf("old tunnel after restart: dial ok after %v, GET: %v",
				time.Since(restarted).Round(time.Millisecond), httpGet(c, "after-restart"))
			break
		}
		if time.Since(restarted) > 5*time.Second {
			t.Logf("old tunnel after restart: still failing after 5s: %v", err)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	closeTunnel(t, old)
	if _, err := dial(old, web, 5*time.Second); err == nil {
		t.Fatal("dial on the closed old tunnel succeeded")
	}

	var sockets2 atomic.Int32
	fresh := newReusable(t, s2.uds, &sockets2)
	for i := 0; i < 3; i++ {
		c, err := dial(fresh, web, 15*time.Second)
		if err != nil {
			t.Fatalf("new tunnel dial %d: %v", i, err)
		}
		if err := httpGet(c, "after-restart"); err != nil {
			t.Fatalf("new tunnel dial %d: %v", i, err)
		}
	}
	noLeftovers(t, s2, agentHealth, 5*time.Second)
	closeTunnel(t, fresh)
}

// 4b. A burst of dials cancelled just after their Proxy stream opened (the
// client then resets the stream with RST_STREAM(CANCEL)) must not end the
// shared HTTP/2 connection: a connection open on the same tunnel survives
// and no new Unix-socket connection is needed.
func TestReusableTunnelCancelBurstKeepsConnection(t *testing.T) {
	_, s, agentHealth := setup(t)
	dst := echoDest(t)
	var sockets atomic.Int32
	rt := newReusable(t, s.uds, &sockets)
	bystander, err := dial(rt, dst, 15*time.Second)
	if err != nil {
		t.Fatalf("bystander dial: %v", err)
	}
	defer bystander.Close()
	for round := 0; round < 3; round++ {
		const n = 40
		var wg sync.WaitGroup
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(2*time.Millisecond*time.Duration(i)/n, cancel)
				if c, err := rt.DialContext(ctx, "tcp", dst); err == nil {
					c.Close()
				}
				cancel()
			}(i)
		}
		if err := within(30*time.Second, "cancelled dials", func() error { wg.Wait(); return nil }); err != nil {
			t.Fatal(err)
		}
		err := within(15*time.Second, "bystander echo", func() error { return echo(bystander, []byte(fmt.Sprintf("round %d", round))) })
		if err != nil || sockets.Load() != 1 {
			for _, l := range s.logs() {
				if strings.Contains(l, "reached limit") || strings.Contains(l, "too_many_resets") {
					t.Logf("server: %s", l)
				}
			}
			t.Fatalf("round %d: bystander connection: %v; Unix-socket connections: %d (want 1)", round, err, sockets.Load())
		}
	}
	bystander.Close()
	noLeftovers(t, s, agentHealth, 10*time.Second)
	closeTunnel(t, rt)
}
