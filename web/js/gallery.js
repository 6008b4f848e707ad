// Recent results: every image a run produced, newest first; click for full size.

export class Gallery {
  constructor(listEl, viewerHost, urlOf, limit = 40) {
    this.listEl = listEl; this.host = viewerHost; this.urlOf = urlOf; this.limit = limit;
  }

  add(images) {
    for (const img of images) {
      const url = this.urlOf(img);
      const a = document.createElement("a");
      a.href = url; a.target = "_blank"; a.className = "gallery-item";
      a.title = img.filename;
      const t = document.createElement("img");
      t.src = url; t.alt = img.filename; t.loading = "lazy";
      a.append(t);
      a.addEventListener("click", (e) => { e.preventDefault(); this.show(url, img.filename); });
      this.listEl.prepend(a);
    }
    while (this.listEl.children.length > this.limit) this.listEl.lastChild.remove();
  }

  show(url, name) {
    const back = document.createElement("div");
    back.className = "modal-back viewer";
    const img = document.createElement("img");
    img.src = url; img.alt = name;
    const link = document.createElement("a");
    link.href = url; link.textContent = name; link.target = "_blank";
    back.append(img, link);
    back.addEventListener("click", (e) => { if (e.target !== link) back.remove(); });
    this.host.append(back);
  }
}
