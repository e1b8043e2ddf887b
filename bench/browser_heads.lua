-- wrk script for bench/http_bench.py --heads browser: what a browser sends with a
-- page's request, an 0.8 KB head with cookies among its fields, and no two heads
-- alike: a counter changes the query string and the Referer. With wrk's own head (43
-- bytes, the same every time) a proxy that keeps the last head of a connection never
-- parses again; with these it parses, routes and rewrites every request afresh.
local counter = 0

init = function(args)
   wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 " ..
      "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
   wrk.headers["Accept"] = "text/html,application/xhtml+xml,application/xml;q=0.9," ..
      "image/avif,image/webp,image/apng,*/*;q=0.8"
   wrk.headers["Accept-Language"] = "en-GB,en-US;q=0.9,en;q=0.8"
   wrk.headers["Accept-Encoding"] = "gzip, deflate, br, zstd"
   wrk.headers["Cookie"] = "sessionid=6f1c2d8e9a7b4c3d2e1f0a9b8c7d6e5f; csrftoken=" ..
      "Zx8Qm2Lr5Tn7Vp1Ks4Hd9Wb3Fg6Jc0Ya; _ga=GA1.1.1234567890.1733011200; " ..
      "_ga_ABCDEF1234=GS1.1.1733011200.3.1.1733011300.0.0.0; theme=dark"
   wrk.headers["sec-ch-ua"] = '"Google Chrome";v="131", "Chromium";v="131", ' ..
      '"Not_A Brand";v="24"'
   wrk.headers["sec-ch-ua-mobile"] = "?0"
   wrk.headers["sec-ch-ua-platform"] = '"Linux"'
   wrk.headers["Sec-Fetch-Site"] = "same-origin"
   wrk.headers["Sec-Fetch-Mode"] = "navigate"
   wrk.headers["Sec-Fetch-Dest"] = "document"
   wrk.headers["Upgrade-Insecure-Requests"] = "1"
end

request = function()
   counter = counter + 1
   wrk.headers["Referer"] = "http://127.0.0.1/dashboard/reports?page=" .. counter
   return wrk.format(nil, wrk.path .. "?v=" .. counter)
end
