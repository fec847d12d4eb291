// The Go/gin side of `python3 tests/bench.py --versus-gin`: the reference
// server reqapi is compared with. It serves, on the object route reqapi
// serves, the exact bytes reqapi answered there (read from -body at start),
// with the same Content-Type and Cache-Control, over the same certificate.
// Nothing here enters reqapi's runtime; the bench builds it with build.sh.
//
// The comparison is only fair as the bench runs it: release mode, no request
// logger (Recovery only), GOMAXPROCS=1 from the environment, pinned to
// reqapi's core with taskset. The first line on stderr says GOMAXPROCS so the
// bench can refuse a run where it is not 1.
package main

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"runtime"

	"github.com/gin-gonic/gin"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8444", "address to listen on")
	certFile := flag.String("cert", "", "PEM certificate (the one reqapi serves)")
	keyFile := flag.String("key", "", "PEM private key of -cert")
	bodyFile := flag.String("body", "", "file with the response body to serve on the object route")
	contentType := flag.String("content-type", "application/json", "Content-Type of that body")
	flag.Parse()
	if *certFile == "" || *keyFile == "" || *bodyFile == "" {
		fmt.Fprintln(os.Stderr, "bench_gin: -cert, -key and -body are required")
		os.Exit(2)
	}
	body, err := os.ReadFile(*bodyFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench_gin:", err)
		os.Exit(2)
	}

	gin.SetMode(gin.ReleaseMode) // before gin.New: no debug route listing or warnings
	r := gin.New()               // no Logger: reqapi's comparison point is gin without per-request logging
	r.Use(gin.Recovery())
	// The route reqapi serves the object on, with the same path parameters (gin routes them).
	r.GET("/apis/k8s.wujiuye.com/v1beta1/namespaces/:namespace/requests/:name", func(c *gin.Context) {
		c.Header("Cache-Control", "no-cache, private") // reqapi sends it too: heads of equal weight
		c.Data(http.StatusOK, *contentType, body)
	})
	r.GET("/livez", func(c *gin.Context) {
		c.Data(http.StatusOK, "text/plain; charset=utf-8", []byte("ok"))
	})

	fmt.Fprintf(os.Stderr, "bench_gin: GOMAXPROCS=%d %s gin %s on https://%s\n",
		runtime.GOMAXPROCS(0), runtime.Version(), gin.Version, *addr)
	if err := r.RunTLS(*addr, *certFile, *keyFile); err != nil {
		fmt.Fprintln(os.Stderr, "bench_gin:", err)
		os.Exit(1)
	}
}
