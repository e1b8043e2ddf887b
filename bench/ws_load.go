// The Go load generator of bench/ws_bench.py (--client go): WebSocket ping-pong of
// 32-byte text messages on N connections, standard library only, frames pre-built.
//
//	go build -o ws_load bench/ws_load.go
//	ws_load -port 8000 -connections 50 -seconds 5
//
// It opens and warms every connection, prints "ready", waits for a line on stdin,
// runs for -seconds, then prints one JSON line: round trips, elapsed seconds and its
// own CPU seconds (so the caller can tell whether the client is the bottleneck).
package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func handshake(port int, path string) (net.Conn, error) {
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return nil, err
	}
	key := make([]byte, 16)
	rand.Read(key)
	req := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"+
		"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
		path, port, base64.StdEncoding.EncodeToString(key))
	if _, err := conn.Write([]byte(req)); err != nil {
		conn.Close()
		return nil, err
	}
	var head []byte
	buf := make([]byte, 1)
	for !bytes.HasSuffix(head, []byte("\r\n\r\n")) { // byte by byte: nothing read past the head
		if _, err := conn.Read(buf); err != nil {
			conn.Close()
			return nil, err
		}
		head = append(head, buf[0])
	}
	if !bytes.HasPrefix(head, []byte("HTTP/1.1 101 ")) {
		conn.Close()
		return nil, fmt.Errorf("bad handshake answer: %q", head)
	}
	return conn, nil
}

func frames(size int) ([]byte, []byte) {
	payload := bytes.Repeat([]byte("x"), size)
	mask := []byte{0x11, 0x22, 0x33, 0x44}
	client := []byte{0x81, 0x80 | byte(size)}
	client = append(client, mask...)
	for i, b := range payload {
		client = append(client, b^mask[i%4])
	}
	server := append([]byte{0x81, byte(size)}, payload...)
	return client, server
}

func echo(conn net.Conn, out, expected, in []byte) error {
	if _, err := conn.Write(out); err != nil {
		return err
	}
	if _, err := io.ReadFull(conn, in); err != nil {
		return err
	}
	if !bytes.Equal(in, expected) {
		return fmt.Errorf("echo mismatch: %q", in)
	}
	return nil
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	return float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
}

func main() {
	port := flag.Int("port", 0, "port of the WebSocket echo server or proxy")
	connections := flag.Int("connections", 50, "concurrent WebSocket connections")
	seconds := flag.Float64("seconds", 5, "how long to run")
	size := flag.Int("size", 32, "message size in bytes (< 126)")
	path := flag.String("path", "/rtt", "request path")
	flag.Parse()
	out, expected := frames(*size)
	conns := make([]net.Conn, *connections)
	for i := range conns {
		conn, err := handshake(*port, *path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "handshake:", err)
			os.Exit(1)
		}
		if err := echo(conn, out, expected, make([]byte, len(expected))); err != nil {
			fmt.Fprintln(os.Stderr, "warm-up:", err)
			os.Exit(1)
		}
		conns[i] = conn
	}
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')
	var trips atomic.Int64
	var failed atomic.Value
	cpu0, t0 := cpuSeconds(), time.Now()
	stop := t0.Add(time.Duration(*seconds * float64(time.Second)))
	var wg sync.WaitGroup
	for _, conn := range conns {
		wg.Add(1)
		go func(conn net.Conn) {
			defer wg.Done()
			in := make([]byte, len(expected))
			for time.Now().Before(stop) {
				if err := echo(conn, out, expected, in); err != nil {
					failed.Store(err.Error())
					return
				}
				trips.Add(1)
			}
		}(conn)
	}
	wg.Wait()
	elapsed, cpu := time.Since(t0).Seconds(), cpuSeconds()-cpu0
	for _, conn := range conns {
		conn.Write([]byte{0x88, 0x82, 0x11, 0x22, 0x33, 0x44, 0x03 ^ 0x11, 0xe8 ^ 0x22}) // close 1000
		conn.Close()
	}
	if err := failed.Load(); err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		os.Exit(1)
	}
	json.NewEncoder(os.Stdout).Encode(map[string]float64{
		"trips": float64(trips.Load()), "elapsed": elapsed, "cpu": cpu})
}
